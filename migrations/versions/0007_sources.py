"""sources, and audiences.source naming one

A source is where audience queries run: a SQLAlchemy URL in `url`, or the name of an environment variable
holding one (a URL with a password) in `url_env`. An audience whose `source` is NULL runs on
SYNC_SOURCE_URL, else on the state database, as before. `audiences.source` holds the source's name, with no
foreign key: a name that matches no row (a typo, a renamed source) makes that audience invalid with a message
when it runs, the same on SQLite, whose shell does not enforce foreign keys, as on Postgres.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("url_env", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sources")),
        sa.UniqueConstraint("name", name=op.f("uq_sources_name")),
    )
    # not a batch: on SQLite a batch that recreated `audiences` would drop its AUTOINCREMENT (0003) and,
    # with foreign keys on, empty every table referencing it; SQLite (3.35+) adds and drops a column in place
    op.add_column("audiences", sa.Column("source", sa.Text(), nullable=True))


def downgrade() -> None:
    # the older version runs every audience on SYNC_SOURCE_URL (or the state database)
    op.drop_column("audiences", "source")
    op.drop_table("sources")
