"""Engines for the state and source databases, and the schema (Alembic) check and upgrade."""

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from sync.errors import StateError

log = logging.getLogger(__name__)
# Connections kept open between runs. The runner uses up to 4 audiences x (1 for the members + 1 per
# destination) at once, plus brief ones for leases; with fewer kept, each run past them opened (on
# Postgres: started a server process for) and closed connections of its own.
POOL_SIZE = 16
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _migrations_dir() -> Path:
    if MIGRATIONS.is_dir():  # a checkout or an editable install
        return MIGRATIONS
    import sync.migrations  # type: ignore[import-not-found]  # a wheel install ships them in the package

    return Path(next(iter(sync.migrations.__path__)))


def describe(url: str) -> str:
    """Where a database is, for logs and messages: the absolute file for SQLite, no password, no query."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return "a URL that is not a SQLAlchemy URL (e.g. sqlite:///audience-sync.db or postgresql://host/db)"
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return f"sqlite file {Path(parsed.database or '').resolve()}"
    # the query string is left out: it may hold a password (`?password=...`) that hide_password misses
    return parsed.set(query={}).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA busy_timeout = 120000")
    # WAL lets the read-only audience query and the staging writes share one file.
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


def create_engine(url: str) -> sa.Engine:
    """An engine for `url`; SQLite gets foreign keys, a busy timeout and WAL."""
    try:
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        in_memory = parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")
        # No pool limit to time out on: the runner's threads bound the connections in use.
        pool = {} if in_memory else {"pool_size": POOL_SIZE, "max_overflow": -1}
        engine = sa.create_engine(parsed, pool_pre_ping=True, **pool)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise StateError(f"cannot use database URL {describe(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """A database that is down, refuses us or is not a database (a SQLite file of garbage) in one line."""
    try:
        yield
    except sa.exc.DatabaseError as exc:
        raise StateError(f"cannot reach the state database ({describe(url)}): {exc.orig}") from None


def upgrade(url: str) -> None:
    """Bring the state database to the newest schema."""
    with _reaching(url):
        command.upgrade(alembic_config(url), "head")


def check_migrated(engine: sa.Engine, url: str) -> None:
    """Fail clearly when the state database is unreachable or behind the code's schema."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with _reaching(url), engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        state = "is not migrated" if current is None else f"is at revision {current}, not {head}"
        raise StateError(f"the state database ({describe(url)}) {state}: run `audience-sync db upgrade`")
