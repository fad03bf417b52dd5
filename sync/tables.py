"""The state database's tables: configuration (edited by operators) and internal sync state."""

import collections
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An aware UTC datetime on both backends (SQLite keeps no time zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_column(name: str) -> sa.Column[Any]:
    return sa.Column(
        name, sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False, server_default=sa.text("'{}'")
    )


def _enabled() -> sa.Column[bool]:
    return sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true())


def _audience_fk() -> sa.Column[int]:
    return sa.Column("audience_id", sa.ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True)


def _destination_fk(primary_key: bool = True) -> sa.Column[int]:
    return sa.Column(
        "destination_id",
        sa.ForeignKey("destinations.id", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=not primary_key,
    )


destinations = sa.Table(
    "destinations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("api_key", sa.Text),
    sa.Column("api_key_env", sa.Text),
    _json_column("settings"),
    _enabled(),
    sqlite_autoincrement=True,  # SQLite: a new row never takes a deleted one's id (and its leftover rows)
)

audiences = sa.Table(
    "audiences",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("key", sa.Text, unique=True),
    sa.Column("query", sa.Text, nullable=False),
    sa.Column("schedule", sa.Text),
    sa.Column("source", sa.Text),  # a `sources` name; NULL: SYNC_SOURCE_URL, else the state database
    _enabled(),
    sqlite_autoincrement=True,  # SQLite: a new row never takes a deleted one's id (and its leftover rows)
)

# Where audience queries run: a SQLAlchemy URL, or the environment variable holding one with a password.
sources = sa.Table(
    "sources",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("url", sa.Text),
    sa.Column("url_env", sa.Text),
    _enabled(),
)

audience_destinations = sa.Table(
    "audience_destinations",
    metadata,
    _audience_fk(),
    _destination_fk(),
    _json_column("settings"),
    _enabled(),
)

# Per connection and user: what the destination last accepted.
sync_state = sa.Table(
    "sync_state",
    metadata,
    _audience_fk(),
    _destination_fk(),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("member", sa.Boolean, nullable=False),
    sa.Column("traits", sa.Text, nullable=False),
    sa.Column("changes", sa.Integer, nullable=False),
    sa.Column("remote_id", sa.Text),
    sa.Column("remote_active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("remote_code", sa.Text),
    sa.Column("accepted_at", UTCDateTime),  # NULL: nothing accepted yet, only a change in doubt
    # since when a change of the user's may have reached the destination unanswered (sent, no answer): the
    # destination may hold the opposite of `member`, so the diff sends whichever change membership calls for
    sa.Column("in_doubt_since", UTCDateTime),
    # what the last `reconcile` found of the user at the destination (`reconcile.Outcome`), why, since which
    # reconcile it has found that, and the destination's own time of the record (Everflow's conversion);
    # cleared when a run changes the user's state: the destination's record is then unverified again
    sa.Column("reconciled", sa.Text),
    sa.Column("reconciled_reason", sa.Text),
    sa.Column("reconciled_at", UTCDateTime),
    sa.Column("remote_at", UTCDateTime),
)

# Per connection: the key it was synced under and whether its initial sync completed.
sync_connections = sa.Table(
    "sync_connections",
    metadata,
    _audience_fk(),
    _destination_fk(),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("initial_completed_at", UTCDateTime),
)


def _run_columns(*counts: str) -> list[sa.Column[Any]]:
    """A run record's columns: its id, connection (no destination: the audience as a whole), start, end,
    outcome and `counts` (0 by default)."""
    return [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("audience_id", sa.ForeignKey("audiences.id", ondelete="CASCADE"), nullable=False),
        _destination_fk(primary_key=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        *(sa.Column(name, sa.Integer, nullable=False, server_default="0") for name in counts),
    ]


sync_runs = sa.Table(
    "sync_runs",
    metadata,
    *_run_columns(
        "members",
        "entered",
        "exited",
        "accepted",
        "rejected",
        "skipped",
        "failed",
        "null_user_ids",
        "duplicate_user_ids",
        "long_user_ids",  # longer than MAX_USER_ID_BYTES: skipped like NULL ones
        "countries_left_out",  # Refersion affiliates created without a country it does not list
    ),
    # changes left for the next run: not accepted, rejected or skipped; NULL when not known (a failed query)
    sa.Column("pending", sa.Integer),
    sa.Column("error", sa.Text),
    # an audience's last start, which the daemon reads every reload, is one index lookup however long
    # the history
    sa.Index("ix_sync_runs_audience_id_started_at", "audience_id", "started_at"),
)

# Per connection, one row per `reconcile`: how it went (`outcome`: ok, drifted, repairing, held or cannot
# verify, with `error` saying why) and what it found.
sync_reconcile_runs = sa.Table(
    "sync_reconcile_runs",
    metadata,
    *_run_columns("confirmed", "drifted", "missing", "rejected", "not_found", "not_ours", "repairs"),
    sa.Column("error", sa.Text),
    sa.Index("ix_sync_reconcile_runs_audience_id_started_at", "audience_id", "started_at"),
)

sync_rejections = sa.Table(
    "sync_rejections",
    metadata,
    _audience_fk(),
    _destination_fk(),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("value", sa.Boolean, nullable=False),
    sa.Column("traits", sa.Text, nullable=False),  # a rejected entry is offered again once they change
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("rejected_at", UTCDateTime, nullable=False),
)

sync_leases = sa.Table(
    "sync_leases",
    metadata,
    sa.Column("audience_id", sa.ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)


# Per database connection, temporary: the members of the audience being run, one row per user, traits as
# JSON text. Created by `staging.stage_members`, not by migrations (hence its own MetaData).
sync_stage = sa.Table(
    "sync_stage_members",
    sa.MetaData(),
    sa.Column("user_id", sa.Text),
    sa.Column("traits", sa.Text),
)

# Per database connection, temporary, next to `sync_stage`: each connection's diff of the run (value true:
# an entry, false: an exit), written once by `diff.Diff` and read in pages.
sync_stage_diff = sa.Table(
    "sync_stage_diff",
    sa.MetaData(),
    sa.Column("destination_id", sa.Integer),
    sa.Column("value", sa.Boolean),
    sa.Column("user_id", sa.Text),
    sa.Column("traits", sa.Text),
    sa.Column("changes", sa.Integer),
    sa.Column("remote_id", sa.Text),
    sa.Column("remote_active", sa.Boolean),
    sa.Column("remote_code", sa.Text),
    sa.Index("ix_sync_stage_diff", "destination_id", "value", "user_id"),
    prefixes=["TEMPORARY"],
)


def readable_columns(table: sa.Table) -> list[sa.ColumnElement[Any]]:
    """The table's columns, `enabled` read as SQL conditions read it (NULL, a missing row, stays NULL).

    SQLite keeps whatever a shell writes into a BOOLEAN column. A condition reads 'false', 'true' or 2 as
    not enabled (`enabled = 1`), while the driver would hand Python a string, true in an `if`.
    """
    return [(c == sa.true()).label("enabled") if c.name == "enabled" else c for c in table.c]


def destination_columns() -> list[sa.ColumnElement[Any]]:
    """The `destinations` columns with settings as raw text: a malformed JSON row must not break the query."""
    return [
        *(c for c in readable_columns(destinations) if c.name != "settings"),
        sa.cast(destinations.c.settings, sa.Text).label("settings_text"),
    ]


def upsertable_insert(conn: sa.Connection, table: sa.Table) -> Any:
    """An INSERT for `table` that takes ON CONFLICT clauses, on either backend."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


@contextlib.contextmanager
def sqlite_foreign_keys_off(bind: sa.Connection, tables: str) -> Iterator[None]:
    """For a migration: SQLite's foreign keys off while `tables` are recreated, as
    https://sqlite.org/lang_altertable.html prescribes.

    With them on, the DROP TABLE of a batch recreate deletes every row first, and ON DELETE CASCADE empties
    every table that references it; and rows an operator's shell left orphaned cannot be copied. SQLite
    ignores the pragma inside a transaction, so the one in progress is committed first (as Alembic's
    autocommit_block would, which env.py's transaction does not support).
    """
    driver = bind.connection.driver_connection
    assert driver is not None
    if driver.in_transaction:
        driver.commit()
    was_on = bind.exec_driver_sql("PRAGMA foreign_keys").scalar_one()
    bind.exec_driver_sql("PRAGMA foreign_keys = OFF")
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar_one():
        raise RuntimeError("SQLite foreign keys are still on; recreating the tables would cascade deletes")
    orphans_before = _foreign_key_violations(bind)
    bind.exec_driver_sql("BEGIN")
    try:
        yield
        added = _foreign_key_violations(bind) - orphans_before
        if added:
            raise RuntimeError(f"recreating {tables} broke foreign keys: {sorted(added.items())[:5]}")
        driver.commit()
    except BaseException:
        driver.rollback()
        raise
    finally:
        if was_on:
            bind.exec_driver_sql("PRAGMA foreign_keys = ON")


def _foreign_key_violations(bind: sa.Connection) -> collections.Counter[tuple[str, str]]:
    """Rows naming a missing parent, per (table, parent table): not by rowid or foreign key number, which
    a recreated table renumbers."""
    rows = bind.exec_driver_sql("PRAGMA foreign_key_check")
    return collections.Counter((table, parent) for table, _rowid, parent, _key in rows)
