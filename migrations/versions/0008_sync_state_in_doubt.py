"""sync_state.in_doubt_since, and sync_state.accepted_at nullable

A change whose request went out and got no answer may have reached the destination: it is *in doubt*. The
state remembers since when, so that a user who leaves after an unanswered entry still gets an exit. A user
whose first entry is in doubt has a row with nothing accepted yet (`accepted_at` NULL, `member` false).

Revision ID: 0008
Revises: 0007
"""

import contextlib
from collections.abc import Iterator, Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

from sync.tables import UTCDateTime, sqlite_foreign_keys_off

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with _recreated_on_sqlite() as batch:
        batch.add_column(sa.Column("in_doubt_since", UTCDateTime(timezone=True), nullable=True))
        batch.alter_column("accepted_at", existing_type=UTCDateTime(timezone=True), nullable=True)


def downgrade() -> None:
    # a row with nothing accepted holds only a doubt: without the column it would read as accepted
    op.execute("DELETE FROM sync_state WHERE accepted_at IS NULL")
    with _recreated_on_sqlite() as batch:
        batch.alter_column("accepted_at", existing_type=UTCDateTime(timezone=True), nullable=False)
        batch.drop_column("in_doubt_since")


@contextlib.contextmanager
def _recreated_on_sqlite() -> Iterator[BatchOperations]:
    """A batch on sync_state: SQLite changes a column's nullability only by copying the table, which keeps
    the rows an operator's shell orphaned only with foreign keys off."""
    bind = op.get_bind()
    off = (
        sqlite_foreign_keys_off(bind, "sync_state")
        if bind.dialect.name == "sqlite"
        else contextlib.nullcontext()
    )
    with off, op.batch_alter_table("sync_state") as batch:
        yield batch
