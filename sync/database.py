"""Engines for the state and source databases, and the schema (Alembic) check and upgrade."""

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from sync import statefile
from sync.errors import ConfigError, StateError, SyncError
from sync.tables import sync_leases

log = logging.getLogger(__name__)
# Connections kept open between runs. The runner uses up to 4 audiences x (1 for the members + 1 per
# destination) at once, plus brief ones for leases; with fewer kept, each run past them opened (on
# Postgres: started a server process for) and closed connections of its own.
POOL_SIZE = 16
# TCP keepalives (libpq's) on pooled Postgres connections: a NAT or firewall that drops idle flows keeps them,
# and a peer that vanished is noticed in about two minutes instead of TCP's retransmission timeout.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 60, "keepalives_interval": 10, "keepalives_count": 6}
# A Postgres server that does not answer: a connection attempt gives up after 10 s, and data it does not
# acknowledge for 30 s drops the connection (a pooled one checked before use, a query sent)
TCP_TIMEOUTS = {"connect_timeout": 10, "tcp_user_timeout": 30_000}
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _migrations_dir() -> Path:
    if MIGRATIONS.is_dir():  # a checkout or an editable install
        return MIGRATIONS
    import sync.migrations  # type: ignore[import-not-found]  # a wheel install ships them in the package

    return Path(next(iter(sync.migrations.__path__)))


def parse(url: str) -> sa.URL | None:
    """The URL, or None when it does not parse as one unambiguous database URL.

    A second `@` (one in a password, unescaped) makes SQLAlchemy take the rest of the password for the host,
    the port or the database, which messages would then show.
    """
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        return None
    if parsed.get_backend_name() != "sqlite" and url.count("@") > 1:
        return None
    return parsed


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (`file:` URIs too), None for another database or an in-memory one."""
    parsed = parse(url)
    if parsed is None or parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    name = parsed.database or ""
    if parsed.query.get("uri") == "true" and name.startswith("file:"):
        name = unquote(urlsplit(name).path)
    return Path(name).resolve()


def describe(url: str) -> str:
    """Where a database is, for logs and messages: the absolute file for SQLite, no password, no query."""
    parsed = parse(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "a URL that is not a SQLAlchemy URL (e.g. sqlite:///audience-sync.db or postgresql://host/db)"
    if parsed is None:  # all of the user information, up to the last `@`: no part of a password may show
        _, at, place = rest.rpartition("@")
        return f"{scheme}://{'***@' if at else ''}{place.partition('?')[0]}"
    path = sqlite_file(url)
    if path is not None:
        return f"sqlite file {path}"
    # the query string is left out: it may hold a password (`?password=...`) that hide_password misses
    return parsed.set(query={}).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA busy_timeout = 120000")
    # WAL lets the read-only audience query and the staging writes share one file.
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


# A DuckDB source file's buffers (blocks of the file it read, kept up to memory_limit: by default most of the
# machine's memory, so a 10M-row read peaked at 452 MB, under 200 MB with these) and threads, bounded for a
# process that also stages; a GROUP BY and ORDER BY over a million rows still runs in them (not at 32MB).
# `duckdb:////path/lake.duckdb?memory_limit=1GB&threads=8` sets others.
DUCKDB_SOURCE_LIMITS = {"memory_limit": "48MB", "threads": "2"}


# The state database's: its SQL (the diff, leases, staging) is written for these two
STATE_BACKENDS = ("sqlite", "postgresql")
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


def create_engine(
    url: str, pool_recycle: float = 180.0, create: bool = False, source: bool = False
) -> sa.Engine:
    """An engine for `url`. SQLite gets foreign keys, a busy timeout and WAL, and a file that must exist
    unless `create` (which makes it readable by its owner only); other databases get connections replaced
    after `pool_recycle` seconds (below the idle timeouts of NAT gateways) and, on Postgres, TCP keepalives.

    A `source` engine (SYNC_SOURCE_URL) for DuckDB opens the database file read-only and limits file access to
    its directory; one the source guard cannot make read-only is logged. A source that is a file (DuckDB,
    SQLite) is opened for each use and closed after it, not pooled: between runs nothing holds it, so another
    process can take its write lock, and a file replaced by a rename is the one the next run reads.
    """
    what = ("source URL", ConfigError) if source else ("database URL", StateError)
    parsed = _url(url, what)
    backend = parsed.get_backend_name()
    if not source and backend not in STATE_BACKENDS:
        raise StateError(
            f"cannot use database URL {describe(url)}: the state database must be SQLite or Postgres, not "
            f"{backend} (other databases can be sources of audience queries: see Sources in the README)"
        )
    in_memory = backend in ("sqlite", "duckdb") and parsed.database in (None, "", ":memory:")
    options: dict[str, Any] = {} if in_memory else {"pool_size": POOL_SIZE, "max_overflow": -1}
    if source and not in_memory and backend in ("sqlite", "duckdb"):
        options = {"poolclass": sa.pool.NullPool}
    connect_args: dict[str, Any] = {}
    if backend == "sqlite" and create:
        statefile.create_private(sqlite_file(url))
    elif backend == "sqlite" and not in_memory and parsed.query.get("uri") != "true":
        uri = {**parsed.query, "mode": "rw", "uri": "true"}  # mode=rw: open the file, never create it
        parsed = parsed.set(database=f"file:{quote(parsed.database or '')}", query=uri)
    elif backend not in ("sqlite", "duckdb"):
        options["pool_recycle"] = pool_recycle
        if parsed.drivername in ("postgresql+psycopg", "postgresql+psycopg2"):  # get_driver_name() loads it
            connect_args = {k: v for k, v in (KEEPALIVES | TCP_TIMEOUTS).items() if k not in parsed.query}
    if source and backend == "duckdb" and not in_memory:
        connect_args["read_only"] = True
        connect_args["config"] = dict(DUCKDB_SOURCE_LIMITS)  # the URL's query overrides them
    # No pool limit to time out on: the runner's threads bound the connections in use.
    engine = _engine(url, parsed, what, pool_pre_ping=True, connect_args=connect_args, **options)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    if source:
        _guard_source(engine, url, in_memory)
    return engine


def _url(url: str, what: tuple[str, type[SyncError]]) -> sa.URL:
    """The URL parsed, with the drivers installed with audience-sync where it names none."""
    parsed = parse(url)
    if parsed is None and "://" not in url:
        raise what[1](f"cannot use {describe(url)}")
    if parsed is None:
        raise what[1](
            f"cannot use {what[0]} {describe(url)}: it does not parse (a port that is not a number? "
            "write an `@` in a user name or password as %40)"
        )
    backend = parsed.get_backend_name()
    if backend == "postgres":  # libpq's own scheme, which SQLAlchemy does not take
        parsed = parsed.set(drivername=parsed.drivername.replace("postgres", "postgresql", 1))
        backend = "postgresql"
    if backend == "postgresql" and parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    if backend in ("mysql", "mariadb") and "+" not in parsed.drivername:
        return parsed.set(drivername=f"{backend}+pymysql")  # pure Python, installed with us
    return parsed


def _engine(url: str, parsed: sa.URL, what: tuple[str, type[SyncError]], **options: Any) -> sa.Engine:
    """`sa.create_engine`, with a missing dialect or driver answered by the package to install."""
    name, error = what
    try:
        return sa.create_engine(parsed, **options)
    except sa.exc.NoSuchModuleError:
        # the driver as named: get_driver_name() would load the dialect that is missing
        driver = parsed.drivername.partition("+")[2]
        package = PACKAGES.get(parsed.get_backend_name()) or PACKAGES.get(driver)
        install = f"pip install {package}" if package else "install its SQLAlchemy dialect package"
        raise error(
            f"cannot use {name} {describe(url)}: no SQLAlchemy dialect {parsed.drivername!r} is installed; "
            + install
        ) from None
    except ImportError as exc:
        package = PACKAGES.get(exc.name or "", exc.name or "its driver")
        raise error(
            f"cannot use {name} {describe(url)}: its driver {exc.name!r} is not installed; "
            f"pip install {package}"
        ) from None
    except sa.exc.ArgumentError as exc:
        raise error(f"cannot use {name} {describe(url)}: {exc}") from None


def _guard_source(engine: sa.Engine, url: str, in_memory: bool) -> None:
    """DuckDB's file access limits; a warning for a source whose queries cannot be made read-only."""
    name = engine.dialect.name
    if name == "duckdb":
        directory = Path.cwd() if in_memory else Path(engine.url.database or "").resolve().parent
        sa.event.listen(engine, "connect", _duckdb_limits(directory))
    if name not in READ_ONLY_DIALECTS or (name == "duckdb" and in_memory):
        log.warning(
            "source %s: audience queries cannot be made read-only on %s; each runs in a transaction that is "
            "rolled back (use a role that can only read)",
            describe(url),
            name,
            extra={"action": "source_not_read_only"},
        )


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


def _revision(conn: sa.Connection, url: str) -> str | None:
    """The state database's schema revision; refused when no migration here knows it."""
    current = MigrationContext.configure(conn).get_current_revision()
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()}
    if current is not None and current not in known:
        raise StateError(
            f"the state database ({describe(url)}) is at revision {current!r}, written by a newer "
            "audience-sync; upgrade the program"
        )
    return current


def upgrade(url: str) -> None:
    """Bring the state database to the newest schema."""
    statefile.check_writable(sqlite_file(url))
    engine = create_engine(url, create=True)
    try:
        with _reaching(url), engine.connect() as conn:
            _revision(conn, url)
    finally:
        engine.dispose()
    with _reaching(url):
        command.upgrade(alembic_config(url), "head")


def revisions(engine: sa.Engine, url: str) -> tuple[str | None, str | None]:
    """The state database's schema revision (None: not migrated) and the newest this program knows; fails
    clearly when the database is missing, unreachable or newer than the code."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StateError(f"no state database at {path}: run `audience-sync db upgrade`")
    statefile.check_writable(path)
    with _reaching(url), engine.connect() as conn:
        current = _revision(conn, url)
    return current, ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def check_migrated(engine: sa.Engine, url: str) -> None:
    """Fail clearly when the state database is missing, unreachable, newer than the code or behind it."""
    current, head = revisions(engine, url)
    if current != head:
        state = "is not migrated" if current is None else f"is at revision {current}, not {head}"
        raise StateError(f"the state database ({describe(url)}) {state}: run `audience-sync db upgrade`")


def check_writable(engine: sa.Engine, url: str) -> None:
    """Fail clearly when the state database refuses writes (a read-only file, a read-only Postgres)."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.delete(sync_leases).where(sa.false()))  # no row: writes nothing, locks nothing
            conn.rollback()
    except sa.exc.DBAPIError as exc:
        raise StateError(f"the state database ({describe(url)}) refuses writes: {exc.orig}") from None
