"""sync_runs indexed by (audience_id, started_at): the daemon's last-run lookup stays one probe per audience

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_sync_runs_audience_id_started_at", "sync_runs", ["audience_id", "started_at"])
    op.drop_index("ix_sync_runs_audience_id", table_name="sync_runs")


def downgrade() -> None:
    op.create_index("ix_sync_runs_audience_id", "sync_runs", ["audience_id"])
    op.drop_index("ix_sync_runs_audience_id_started_at", table_name="sync_runs")
