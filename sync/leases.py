"""Audience leases: one run of an audience at a time, across processes and hosts sharing a state database.

A lease expires TTL seconds after it was last renewed, by the state database's clock (never a host's): two
daemons on hosts whose clocks disagree by minutes still cannot both hold one audience. The holder renews it
from a heartbeat thread every TTL / 4 seconds.

Transactions: each function takes the engine and owns its transactions (one short one per call).
"""

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from sync.errors import first_line
from sync.tables import sync_leases, upsertable_insert

log = logging.getLogger(__name__)
TTL = 120.0  # seconds


class Busy(Exception):
    """The audience's lease is held by another live process, named in `holder`."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def this_process() -> str:
    """The owner name of this process: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _database_time(conn: sa.Connection, seconds: float = 0.0) -> sa.ColumnElement[Any]:
    """The state database's clock, `seconds` ahead, in the form `expires_at` is stored in."""
    if conn.dialect.name == "sqlite":  # text as SQLAlchemy stores a DateTime there: microseconds, no zone
        moment = sa.func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{seconds:+f} seconds")
        return moment.op("||")("000")
    return sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval)


def acquire(conn: sa.Connection, audience_id: int, owner: str, ttl: float) -> str | None:
    """Take or renew the audience's lease; None on success, else the owner holding it."""
    expires = _database_time(conn, ttl)
    statement = upsertable_insert(conn, sync_leases).values(
        audience_id=audience_id, owner=owner, expires_at=expires
    )
    taken = conn.execute(
        statement.on_conflict_do_update(
            index_elements=["audience_id"],
            set_={"owner": statement.excluded.owner, "expires_at": statement.excluded.expires_at},
            where=(sync_leases.c.expires_at < _database_time(conn)) | (sync_leases.c.owner == owner),
        ).returning(sync_leases.c.owner)
    ).first()
    if taken is not None:
        return None
    holder: str | None = conn.scalar(
        sa.select(sync_leases.c.owner).where(sync_leases.c.audience_id == audience_id)
    )
    return holder or "another process"


def holders(conn: sa.Connection) -> dict[int, str]:
    """The live leases: audience id -> the owner running it (`status`)."""
    live = sa.select(sync_leases).where(sync_leases.c.expires_at > _database_time(conn))
    return {row.audience_id: row.owner for row in conn.execute(live)}


def _take_over(conn: sa.Connection, audience_id: int, owner: str, previous: str, ttl: float) -> bool:
    """Take the lease from `previous` (a process known to be dead); False if someone else got it first."""
    taken = conn.execute(
        sa.update(sync_leases)
        .where(sync_leases.c.audience_id == audience_id, sync_leases.c.owner == previous)
        .values(owner=owner, expires_at=_database_time(conn, ttl))
        .returning(sync_leases.c.owner)
    ).first()
    return taken is not None


def release(conn: sa.Connection, audience_id: int, owner: str) -> None:
    conn.execute(
        sa.delete(sync_leases).where(sync_leases.c.audience_id == audience_id, sync_leases.c.owner == owner)
    )


def release_all(engine: sa.Engine, owner: str) -> None:
    """Every lease `owner` holds: for a process exiting at once."""
    with engine.begin() as conn:
        conn.execute(sa.delete(sync_leases).where(sync_leases.c.owner == owner))


def _take(engine: sa.Engine, audience_id: int, owner: str, label: str) -> None:
    """Take the lease, or take it over from a dead process of this host; raise Busy if another holds it."""
    with engine.begin() as conn:
        holder = acquire(conn, audience_id, owner, TTL)
        if holder and _dead_here(holder) and _take_over(conn, audience_id, owner, holder, TTL):
            log.warning(
                "%s: took over the lease of %s, which is no longer running",
                label,
                holder,
                extra={"action": "lease_taken_over", "audience_id": audience_id},
            )
            holder = None
    if holder:
        raise Busy(holder)


@contextmanager
def hold(engine: sa.Engine, audience_id: int, owner: str, label: str) -> Iterator[threading.Event]:
    """Hold the audience's lease while the block runs, renewed by a heartbeat; yields an event set when the
    lease was lost (taken by another process after this one stalled, or renewing failed). Raises Busy when
    another live process holds it. `label` names the audience in logs."""
    _take(engine, audience_id, owner, label)
    lost = threading.Event()
    done = threading.Event()

    def renew() -> None:
        while not done.wait(TTL / 4):
            try:
                with engine.begin() as conn:
                    holder = acquire(conn, audience_id, owner, TTL)
            except sa.exc.DBAPIError as exc:
                holder = f"nobody we can tell (renewing failed: {first_line(exc)})"
            if holder:
                log.error(
                    "%s: lease lost to %s; stopping this run",
                    label,
                    holder,
                    extra={"action": "lease_lost", "audience_id": audience_id},
                )
                lost.set()
                return

    heartbeat = threading.Thread(target=renew, name=f"lease-{audience_id}", daemon=True)
    heartbeat.start()
    try:
        yield lost
    finally:
        done.set()
        heartbeat.join()
        with engine.begin() as conn:
            release(conn, audience_id, owner)


def _dead_here(owner: str) -> bool:
    """Whether a lease owner (`host:pid`) is a process of this host that no longer runs (killed, crashed)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
