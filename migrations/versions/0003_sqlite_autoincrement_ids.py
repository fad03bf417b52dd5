"""audiences.id and destinations.id AUTOINCREMENT on SQLite: a deleted row's id is never handed out again

Without it SQLite gives a new row the id of the deleted highest one, and an operator's `sqlite3` shell
(foreign keys off) leaves the deleted row's connections and sync state behind for the newcomer to inherit.
Postgres sequences never reuse an id, so this is a no-op there.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.tables import sqlite_foreign_keys_off

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("audiences", "destinations")


def upgrade() -> None:
    _recreate(autoincrement=True)


def downgrade() -> None:
    _recreate(autoincrement=False)


def _recreate(autoincrement: bool) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    with sqlite_foreign_keys_off(bind, ", ".join(TABLES)):
        for table in TABLES:
            with op.batch_alter_table(
                table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
            ):
                pass
            if autoincrement:
                _start_sequence_past_every_reference(bind, table)


def _start_sequence_past_every_reference(bind: sa.Connection, table: str) -> None:
    """Rows already orphaned by a shell DELETE must not be inherited either: start past every id they name."""
    inspector = sa.inspect(bind)
    columns = [(table, "id")] + [
        (child, fk["constrained_columns"][0])
        for child in inspector.get_table_names()
        for fk in inspector.get_foreign_keys(child)
        if fk["referred_table"] == table
    ]
    highest = max(
        bind.exec_driver_sql(f'SELECT coalesce(max("{c}"), 0) FROM "{t}"').scalar_one() for t, c in columns
    )
    bind.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
    if highest:
        bind.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, highest))
