"""Engines for the state and source databases, and the schema (Alembic) check and upgrade."""

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from sync.errors import ConfigError, StateError, SyncError

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


# Dialects whose audience queries the source guard (sync.audiences) can make read-only; any other runs its
# queries in a transaction that is always rolled back.
READ_ONLY_DIALECTS = ("postgresql", "sqlite", "mysql", "mariadb", "duckdb")
# The package to install for a URL whose dialect or driver is missing: by backend or driver name, then by
# the module that failed to import
PACKAGES = {
    "duckdb": "'audience-sync[duckdb]' (duckdb-engine)",
    "snowflake": "snowflake-sqlalchemy",
    "bigquery": "sqlalchemy-bigquery",
    "redshift": "sqlalchemy-redshift redshift-connector",
    "trino": "'trino[sqlalchemy]'",
    "databricks": "databricks-sqlalchemy",
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
}


def create_engine(url: str, source: bool = False) -> sa.Engine:
    """An engine for `url`; SQLite gets foreign keys, a busy timeout and WAL.

    A `source` engine (SYNC_SOURCE_URL) for DuckDB opens the database file read-only and limits file access to
    its directory; one the source guard cannot make read-only is logged.
    """
    what = "source URL" if source else "database URL"
    error: type[SyncError] = ConfigError if source else StateError
    connect_args: dict[str, Any] = {}
    try:
        parsed = sa.make_url(url)
        backend = parsed.get_backend_name()
        if backend == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        if backend in ("mysql", "mariadb") and "+" not in parsed.drivername:
            parsed = parsed.set(drivername=f"{backend}+pymysql")  # pure Python, installed with us
        in_memory = backend in ("sqlite", "duckdb") and parsed.database in (None, "", ":memory:")
        if source and backend == "duckdb" and not in_memory:
            connect_args["read_only"] = True
        # No pool limit to time out on: the runner's threads bound the connections in use.
        pool = {} if in_memory else {"pool_size": POOL_SIZE, "max_overflow": -1}
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **pool)
    except sa.exc.NoSuchModuleError:
        package = PACKAGES.get(parsed.get_backend_name()) or PACKAGES.get(parsed.get_driver_name())
        install = f"pip install {package}" if package else "install its SQLAlchemy dialect package"
        raise error(
            f"cannot use {what} {describe(url)}: no SQLAlchemy dialect {parsed.drivername!r} is installed; "
            + install
        ) from None
    except ImportError as exc:
        package = PACKAGES.get(exc.name or "", exc.name or "its driver")
        raise error(
            f"cannot use {what} {describe(url)}: its driver {exc.name!r} is not installed; "
            f"pip install {package}"
        ) from None
    except sa.exc.ArgumentError as exc:
        raise error(f"cannot use {what} {describe(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    if source and engine.dialect.name == "duckdb":
        directory = Path.cwd() if in_memory else Path(parsed.database or "").resolve().parent
        sa.event.listen(engine, "connect", _duckdb_limits(directory))
    if source and (engine.dialect.name not in READ_ONLY_DIALECTS or (backend == "duckdb" and in_memory)):
        log.warning(
            "source %s: audience queries cannot be made read-only on %s; each runs in a transaction that is "
            "rolled back (use a role that can only read)",
            describe(url),
            engine.dialect.name,
            extra={"action": "source_not_read_only"},
        )
    return engine


def _duckdb_limits(directory: Path) -> Callable[[Any, Any], None]:
    """A connect hook: DuckDB reads and writes files only in `directory` (the database file's), for good.

    `enable_external_access = false` cannot be undone on a running database, and once it is off the allowed
    directories cannot change; the second connection of a pool finds them set.
    """

    def limit(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT current_setting('enable_external_access')")
        if cursor.fetchone()[0]:
            quoted = str(directory).replace("'", "''")
            cursor.execute(f"SET allowed_directories = ['{quoted}/']")
            cursor.execute("SET enable_external_access = false")

    return limit


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
