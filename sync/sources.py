"""Sources: the database each audience's query runs on, and one engine per source for the process.

An audience's `source` names a row of the `sources` table, whose `url` is a SQLAlchemy URL without a password
or whose `url_env` names the environment variable holding one with a password; NULL means SYNC_SOURCE_URL,
else the state database itself. A source that cannot be used makes its audiences invalid, each with a message
naming the rows; the other audiences keep syncing. No message shows a URL's password or a `url_env` value
beyond what `database.describe` shows.

Transactions: `Sources.engine` reads the `sources` row with the caller's connection and leaves its
transaction to the caller.
"""

import threading
from typing import Any

import sqlalchemy as sa

from sync import database
from sync.audiences import Audience
from sync.errors import ConfigError
from sync.settings import secret_from_env
from sync.tables import audiences, readable_columns, sources

# Query parameters of a URL that hold a password, as drivers name them (psycopg's `password`, ODBC's `pwd`,
# libpq's `sslpassword`, a warehouse's `token`)
SECRET_PARAMETERS = {"password", "pwd", "passwd", "sslpassword", "token"}


class Sources:
    """The engines audience queries run on, kept for the process by source name; one is rebuilt when its
    row's URL changes (`url`, or the value of the variable `url_env` names)."""

    def __init__(self, default: sa.Engine, pool_recycle: float = 180.0) -> None:
        self.default = default  # for audiences with no source: SYNC_SOURCE_URL's, or the state database
        self.pool_recycle = pool_recycle
        self.engines: dict[str, tuple[str, sa.Engine]] = {}  # by name: the URL it was made for, the engine
        self.lock = threading.Lock()

    def engine(self, conn: sa.Connection, audience: Audience) -> sa.Engine:
        """The engine the audience's query runs on, its `sources` row read with `conn` (the state database);
        a ConfigError naming the audience and the row when that source cannot be used."""
        if audience.source is None:
            return self.default
        row = conn.execute(
            sa.select(*readable_columns(sources)).where(sources.c.name == audience.source)
        ).one_or_none()
        if row is None:
            raise ConfigError(f"{audience}: no sources row is named {audience.source!r} (audiences.source)")
        where = f"{audience}: sources row id={row.id} ({row.name!r})"
        if not row.enabled:
            raise ConfigError(f"{where} is disabled")
        url = _url(row, where)
        with self.lock:
            known = self.engines.get(row.name)
            if known and known[0] == url:
                return known[1]
            engine = _engine(url, where, self.pool_recycle)
            self.engines[row.name] = (url, engine)
        if known:  # a run still reading from the old one keeps its connection until it returns it
            known[1].dispose()
        return engine

    def close(self) -> None:
        """Dispose of the engines made here (not the default one, which the caller made)."""
        with self.lock:
            made = [engine for _, engine in self.engines.values()]
            self.engines.clear()
        for engine in made:
            engine.dispose()


def unused_problems(conn: sa.Connection) -> list[str]:
    """What would stop each enabled `sources` row no audience names (for `check`, as warnings: no run uses
    it yet)."""
    named = sa.select(audiences.c.source).where(audiences.c.source.is_not(None))
    rows = conn.execute(
        sa.select(*readable_columns(sources))
        .where(sources.c.enabled, sources.c.name.not_in(named))
        .order_by(sources.c.id)
    )
    found = []
    for row in rows:
        where = f"sources row id={row.id} ({row.name!r}), which no audience names yet"
        try:
            _engine(_url(row, where), where).dispose()
        except ConfigError as exc:
            found.append(str(exc))
    return found


def _engine(url: str, where: str, pool_recycle: float = 180.0) -> sa.Engine:
    try:
        return database.create_engine(url, pool_recycle, source=True)
    except ConfigError as exc:  # no dialect or driver for it, or a URL that does not parse
        raise ConfigError(f"{where}: {exc}") from None


def _url(row: sa.Row[Any], where: str) -> str:
    """The URL of a `sources` row: `url`, or the value of the environment variable `url_env` names."""
    if row.url and row.url_env:
        raise ConfigError(
            f"{where}: url and url_env are both set; keep one (url_env for a URL with a password)"
        )
    if row.url_env:
        return secret_from_env(row.url_env, f"{where}: url_env", "the URL")
    if not row.url:
        raise ConfigError(
            f"{where}: neither url nor url_env is set (url_env: an environment variable holding the URL)"
        )
    if not isinstance(row.url, str):
        raise ConfigError(f"{where}: url holds {type(row.url).__name__} data, not text")
    parsed = database.parse(row.url)
    if parsed is not None and (parsed.password or SECRET_PARAMETERS & {k.lower() for k in parsed.query}):
        raise ConfigError(
            f"{where}: url holds a password; put the URL in an environment variable and its name in url_env"
        )
    return row.url
