"""The watchdog: ends an audience query that its database does not end, from a thread beside it.

A database's own timeout stops a query the server is running, not a read from a connection that stopped
answering (a proxy or a NAT that drops the flow, a server that hangs): the driver waits on its socket for
ever. The watchdog asks the driver to stop the query (`interrupt()`, `cancel()`) when the process is
stopping, or at the timeout where the database has no timeout of its own; `GRACE` seconds after that (or
after the timeout) it shuts the connection's socket down, which ends any read blocked on it.
"""

import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

GRACE = 5.0  # from the timeout or the request to stop to the socket shut down
POLL = 0.25  # how often the watchdog looks whether the process is stopping
TIMED_OUT = "timed out (SYNC_QUERY_TIMEOUT)"


class Refused(Exception):
    """An audience query stopped by audience-sync itself, not by its database: the reason."""


class Interrupted(Refused):
    """An audience query stopped because the process is stopping."""


class _Watch:
    """What the watchdog thread does for one query, and what it did."""

    def __init__(self, raw: Any, deadline: float, stopping: threading.Event | None, own_timer: bool) -> None:
        self.raw = raw
        self.deadline = deadline
        self.stopping = stopping
        self.own_timer = own_timer  # the database has no timeout: the watchdog stops the query at it
        self.lock = threading.Lock()
        self.running = True
        self.over = threading.Event()
        self.reason: str | None = None
        self.interrupted = False
        self.severed = False

    def run(self) -> None:
        severe_at = self.deadline + GRACE
        while not self.over.wait(POLL):
            now = time.monotonic()
            stopping = self.stopping is not None and self.stopping.is_set()
            if self.reason is None and (stopping or (self.own_timer and now >= self.deadline)):
                self.interrupted = stopping
                self._fire(self._ask_to_stop, "interrupted by shutdown" if stopping else TIMED_OUT)
                severe_at = min(severe_at, now + GRACE)
            elif now >= severe_at:
                no_answer = f"{TIMED_OUT}: no answer {GRACE:g}s past it; the connection was closed"
                self._fire(self._sever, self.reason or no_answer)
                return

    def _ask_to_stop(self) -> bool:
        """The driver's way to stop a query (none in PyMySQL: its socket is shut down after GRACE)."""
        stop = getattr(self.raw, "interrupt", None) or getattr(self.raw, "cancel", None)
        if hasattr(self.raw, "cancel_safe"):  # psycopg 3.2: a cancel that cannot hang on a silent network
            stop = functools.partial(self.raw.cancel_safe, timeout=GRACE)
        if stop is not None:
            with contextlib.suppress(Exception):  # a cancel that fails: the socket is shut down after GRACE
                stop()
        return True

    def _sever(self) -> bool:
        self.severed = _shut_down(self.raw)
        return self.severed

    def _fire(self, action: Callable[[], bool], reason: str) -> None:
        with self.lock:  # never once the query is over: the connection may run something else by then
            if not self.running:
                return
            before, self.reason = self.reason, reason  # before it acts: the query may fail at once
            if not action():
                self.reason = before

    def end(self) -> None:
        """The query is over: once this returns, the watchdog does nothing more, and has said what it did."""
        with self.lock:
            self.running = False
        self.over.set()


@contextmanager
def watched(
    conn: sa.Connection, timeout: float, stopping: threading.Event | None = None, own_timer: bool = False
) -> Iterator[None]:
    """Watch what `conn` runs inside: stop it when `stopping` is set (at `timeout` s too when `own_timer`),
    and shut its socket down `GRACE` s after that or after `timeout`. Raises Refused (Interrupted when the
    process is stopping) for an error after the watchdog acted; a connection whose socket it shut down is
    invalidated."""
    watch = _Watch(conn.connection.dbapi_connection, time.monotonic() + timeout, stopping, own_timer)
    threading.Thread(target=watch.run, name="watchdog", daemon=True).start()
    try:
        yield
    except Exception as exc:
        watch.end()
        if watch.reason is not None:
            raise (Interrupted if watch.interrupted else Refused)(watch.reason) from exc
        raise
    finally:
        watch.end()
        if watch.severed:
            conn.invalidate()


def _shut_down(raw: Any) -> bool:
    """Shut the socket of a DBAPI connection down, not close it (its driver owns the descriptor): a read
    blocked on it returns. False for a connection without a socket (sqlite3, DuckDB) or one already closed."""
    fd = _socket_fd(raw)
    if fd is None or fd < 0:
        return False
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


def _socket_fd(raw: Any) -> int | None:
    pgconn = getattr(raw, "pgconn", None)  # psycopg 3
    if pgconn is not None:
        try:
            return int(pgconn.socket)
        except Exception:  # psycopg.OperationalError: the connection is closed
            return None
    sock = getattr(raw, "_sock", None)  # PyMySQL, which has no public way to it; None once closed
    if sock is not None:
        return int(sock.fileno())
    fileno = getattr(raw, "fileno", None)  # psycopg2
    return int(fileno()) if callable(fileno) else None
