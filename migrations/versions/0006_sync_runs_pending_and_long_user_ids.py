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


def upgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("long_user_ids", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("pending", sa.Integer(), nullable=True))  # NULL: not known


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("pending")
        batch.drop_column("long_user_ids")
