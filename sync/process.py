"""The process around a run: one malloc arena and one daemon per SQLite file for the daemon; for the
one-shot commands their signals, progress bars and summary, and the question `initial --baseline` asks."""

import ctypes
import fcntl
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import sqlalchemy as sa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sync import views
from sync.errors import StateError
from sync.runs import Options

if TYPE_CHECKING:
    from sync.runner import Runner

log = logging.getLogger("sync")


def one_malloc_arena() -> None:
    """On glibc, keep the daemon's malloc to one arena (as MALLOC_ARENA_MAX=1); call before threads start.

    glibc gives threads up to 8 arenas per CPU. The daemon's threads (the scheduler's, each run's connection
    and lease threads, the senders') take turns on the same pooled connections and caches, so memory freed
    in one arena is not reused by an allocation in another: with the heap in use flat, the daemon's RSS grew
    by about 0.4 MiB a minute in benchmarks/soak.py. With one arena it grows a third as fast.
    """
    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or no such name
        glibc = False
    if glibc:
        m_arena_max = -8  # malloc.h
        ctypes.CDLL(None).mallopt(m_arena_max, 1)


def only_daemon_on_sqlite(url: str) -> None:
    """On a SQLite state file, hold `<file>.daemon` locked (and holding this pid) for the life of the
    process (its descriptor is never closed), or refuse: a second daemon would find every audience busy in
    the first one, every cycle. Several daemons share a Postgres state database (leases spread the work)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = f"{parsed.database}.daemon"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(
            f"another daemon (pid {other}) already runs on sqlite file {os.path.abspath(parsed.database)}; "
            "one daemon per SQLite file (several daemons can share a Postgres state database)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def stop_on_signals(runner: "Runner") -> list[int]:
    """SIGTERM, SIGINT or SIGHUP: finish the batch in flight and record it (the command then exits 128 + the
    signal's number); a second one: release the leases and exit at once. Returns the signals received."""
    received: list[int] = []
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def act() -> None:  # in a thread: a handler runs in the main thread, wherever it was
        while True:
            signum = signals.get()
            name = signal.Signals(signum).name
            if received:
                log.warning("received %s again: exiting now", name, extra={"action": "exiting_now"})
                Console(stderr=True).show_cursor(True)  # a progress bar hid it (nothing off a terminal)
                runner.abandon()
                os._exit(128 + signum)
            received.append(signum)
            log.warning(
                "received %s: finishing the batch in flight; a second one exits at once",
                name,
                extra={"action": "stopping"},
            )
            runner.stopping.set()

    threading.Thread(target=act, name="signals", daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: signals.put(signum))  # SimpleQueue.put is reentrant
    return received


def run_once(runner: "Runner", options: Options) -> int:
    """`run` or `initial`: one cycle with progress bars on a terminal and a summary; the exit code."""
    received = stop_on_signals(runner)
    options.out = sys.stdout if options.dry_run else None
    if options.dry_run or not sys.stderr.isatty():
        results = runner.run(options)
    else:
        with progress() as shown, logging_above():
            options.progress = bars(shown)
            results = runner.run(options)
    views.summary(results, options.dry_run)
    if received:
        return 128 + received[0]
    return 0 if all(result.good for result in results) else 1


def baseline(runner: "Runner", options: Options, yes: bool) -> int:
    """`initial --baseline`: preview what would be recorded, ask (or take --yes), then record it."""
    asked_dry = options.dry_run
    options.dry_run = True
    preview = runner.run(options)
    views.baseline_preview(preview)
    if asked_dry or not any(result.good for result in preview):
        return 0 if all(result.good for result in preview) else 1
    if not views.confirmed(yes, sum(result.counts.get("entered", 0) for result in preview)):
        return 2
    options.dry_run = False
    results = runner.run(options)
    views.summary(results, dry_run=False)
    return 0 if all(result.good for result in results) else 1


RATES = "{task.fields[rate]:.1f} req/s  failed {task.fields[failed]}  retried {task.fields[retried]}"


def progress() -> Progress:
    """Bars per connection: count, requests per second, failed and retried, elapsed time and ETA (the ETA
    follows the destination's rate limit). Requests and retries are the destination's, shared by its
    connections; failed is the connection's changes not accepted."""
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "{task.fields[rate]:.1f} req/s  failed {task.fields[failed]}  retried {task.fields[retried]}"
        ),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def bars(progress: Progress) -> Callable[[str, int], Callable[[int, dict[str, int]], None]]:
    """A bar per connection: added when its run starts, advanced as its pages are recorded."""

    def start(label: str, total: int) -> Callable[[int, dict[str, int]], None]:
        task = progress.add_task(label, total=total, rate=0.0, failed=0, retried=0)

        def advance(done: int, counted: dict[str, int]) -> None:
            elapsed = progress.tasks[task].elapsed or 0.0
            rate = counted.get("requests", 0) / elapsed if elapsed > 0 else 0.0
            failed, retried = counted.get("failed", 0), counted.get("retried", 0)
            progress.update(task, advance=done, rate=rate, failed=failed, retried=retried)

        return advance

    return start


@contextmanager
def logging_above() -> Iterator[None]:
    """Log lines printed above the bars, not across them. Inside `progress()` rich has replaced sys.stderr
    with a proxy that prints above the live display; the log handlers took the real one when they were made,
    so for the while they write to the proxy."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.setStream(sys.stderr) for h in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams, strict=True):
            if stream is not None:
                handler.setStream(stream)
