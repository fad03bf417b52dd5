"""sync_state.remote_code: a Refersion affiliate's code, beside its numeric id in remote_id

Refersion's /affiliate/new answers with the affiliate's code ("a3y7"); /affiliate/status_change takes the
numeric affiliate id, which /affiliate/get resolves from the code. Earlier versions kept the code in
remote_id and sent it to status_change, which refuses it: those codes move to remote_code, and remote_id
is resolved the first time a status change needs it. Everflow never set remote_id.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sync_state") as batch:
        batch.add_column(sa.Column("remote_code", sa.Text(), nullable=True))
    op.execute("UPDATE sync_state SET remote_code = remote_id, remote_id = NULL WHERE remote_id IS NOT NULL")


def downgrade() -> None:
    # the older version knows only one id and sends it to status_change; the code is what it stored
    op.execute("UPDATE sync_state SET remote_id = remote_code WHERE remote_code IS NOT NULL")
    with op.batch_alter_table("sync_state") as batch:
        batch.drop_column("remote_code")
