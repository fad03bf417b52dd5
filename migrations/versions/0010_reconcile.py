"""sync_state's reconcile outcome per user, and sync_reconcile_runs

`audience-sync reconcile` reads the destinations' own records (Refersion's affiliate list, Everflow's
conversion report) and keeps, per user, what it found (confirmed, drifted, missing, rejected, not found), why,
since when, and the destination's own time; per connection, one row per reconcile.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.tables import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTS = ("confirmed", "drifted", "missing", "rejected", "not_found", "not_ours", "repairs")


def upgrade() -> None:
    # nullable columns without a default: SQLite adds them in place (no table copy)
    op.add_column("sync_state", sa.Column("reconciled", sa.Text(), nullable=True))
    op.add_column("sync_state", sa.Column("reconciled_reason", sa.Text(), nullable=True))
    op.add_column("sync_state", sa.Column("reconciled_at", UTCDateTime(timezone=True), nullable=True))
    op.add_column("sync_state", sa.Column("remote_at", UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        "sync_reconcile_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=True),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False, server_default="0") for name in COUNTS),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_sync_reconcile_runs_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_sync_reconcile_runs_destination_id_destinations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_reconcile_runs")),
    )
    op.create_index(
        "ix_sync_reconcile_runs_audience_id_started_at",
        "sync_reconcile_runs",
        ["audience_id", "started_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_sync_reconcile_runs_audience_id_started_at", table_name="sync_reconcile_runs")
    op.drop_table("sync_reconcile_runs")
    # SQLite (3.35 on) drops a column in place: a batch would copy sync_state, which needs foreign keys off
    for name in ("remote_at", "reconciled_at", "reconciled_reason", "reconciled"):
        op.execute(f"ALTER TABLE sync_state DROP COLUMN {name}")
