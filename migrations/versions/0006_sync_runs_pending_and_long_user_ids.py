"""sync_runs.pending and sync_runs.long_user_ids

`pending`: the changes a run left for the next one (not accepted, rejected or skipped), so status and the
metrics read the exact number. `long_user_ids`: members skipped because their user id is longer than the
documented maximum (an index on such a value would fail every run).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("long_user_ids", "pending")


def upgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
