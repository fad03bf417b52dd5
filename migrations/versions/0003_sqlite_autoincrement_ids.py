"""audiences.id and destinations.id AUTOINCREMENT on SQLite: a deleted row's id is never handed out again

Without it SQLite gives a new row the id of the deleted highest one, and an operator's `sqlite3` shell
(foreign keys off) leaves the deleted row's connections and sync state behind for the newcomer to inherit.
Postgres sequences never reuse an id, so this is a no-op there.

Revision ID: 0003
Revises: 0002
"""

import contextlib
from collections.abc import Iterator, Sequence

import sqlalchemy as sa
from alembic import op

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
    with _foreign_keys_off(bind):
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


@contextlib.contextmanager
def _foreign_keys_off(bind: sa.Connection) -> Iterator[None]:
    """Foreign keys off while the tables are recreated, as https://sqlite.org/lang_altertable.html prescribes.

    With them on, the DROP TABLE of the batch recreate deletes every row first, and ON DELETE CASCADE empties
    every table that references it. SQLite ignores the pragma inside a transaction, so the one in progress is
    committed first (as Alembic's autocommit_block would, which this env.py's transaction does not support).
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
            raise RuntimeError(f"recreating {', '.join(TABLES)} broke foreign keys: {sorted(added)[:5]}")
        driver.commit()
    except BaseException:
        driver.rollback()
        raise
    finally:
        if was_on:
            bind.exec_driver_sql("PRAGMA foreign_keys = ON")


def _foreign_key_violations(bind: sa.Connection) -> set[tuple[object, ...]]:
    return {tuple(row) for row in bind.exec_driver_sql("PRAGMA foreign_key_check")}
