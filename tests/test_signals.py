"""Signals (issue 13, findings 7 and 8): the real command stopped by SIGTERM, SIGINT and SIGHUP.

A first SIGTERM or SIGINT stops taking work, ends the batch in flight (retry waits cut short), records the run
as `interrupted` and releases the lease; a second one exits at once. SIGHUP reloads the daemon's configuration
and stops a one-shot command like SIGTERM.
"""

import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sync.sandbox import EverflowServer
from tests.conftest import Config, Customers, run_cli, start_cli, wait_for
from tests.test_e2e import everflow_destination

USERS = [f"u{i:02d}" for i in range(40)]
EVERYONE_ONCE = {(f"tid-{u}", "7"): 1 for u in USERS}


@contextmanager
def _started(state_url: str, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Any]:
    """The real command in the background, its stderr (JSON log lines) in `log`; killed if still running."""
    with log.open("w") as stderr:
        process = start_cli(
            state_url,
            *args,
            env={"SYNC_LOG_FORMAT": "json", **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _actions(log: Path) -> list[str]:
    """The `action` of each complete JSON log line so far."""
    lines = log.read_text().split("\n")[:-1]  # the last one may still be being written
    return [json.loads(line).get("action", "") for line in lines if line.startswith("{")]


def _accepted(everflow: EverflowServer) -> int:
    return sum(everflow.accepted.values())


def _the_run(config: Config) -> tuple[str, str, int]:
    [(outcome, error, accepted)] = config.sql("SELECT outcome, error, accepted FROM sync_runs")
    return outcome, error, accepted


def _pending(count: int) -> str:
    return f"interrupted by shutdown; {count} changes stay pending for the next run"


def _leases(config: Config) -> int:
    return int(config.sql("SELECT count(*) FROM sync_leases")[0][0])


def test_a_second_sigterm_exits_the_daemon_at_once_without_a_traceback_and_releases_the_lease(
    state_url: str, config: Config, customers: Customers, tmp_path: Path
) -> None:
    """Finding 7: a second SIGTERM crashed the daemon (SchedulerNotRunningError, exit 1, lease row left)."""
    customers.add("u1", "u2")
    log = tmp_path / "daemon.log"
    with EverflowServer(delay=300) as everflow:  # the first page stays in flight for minutes
        config.connect(
            config.audience("VIP", Customers.QUERY), everflow_destination(config, everflow, timeout=600)
        )
        with _started(state_url, log, "daemon") as daemon:
            wait_for(lambda: len(everflow.requests) == 2 and _leases(config) == 1)
            daemon.send_signal(signal.SIGTERM)
            wait_for(
                lambda: "daemon_stopping" in _actions(log)
            )  # the first one was taken: waiting for the page
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=20)  # at once, not when the page's answers come
    assert daemon.returncode == 128 + signal.SIGTERM
    text = log.read_text()
    assert "Traceback" not in text and "daemon_exiting_now" in _actions(log), text
    assert _leases(config) == 0


def _blocked_logging(pid: int) -> bool:
    """Whether the daemon's main thread is blocked logging to the full pipe: writing it, or waiting for the
    logging lock of another thread that is (what each thread waits for: /proc, Linux)."""
    waits = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        # a thread that ended meanwhile: its directory is gone, or its files answer ESRCH
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            waits[task.name] = (task / "wchan").read_text()
    writing = [task for task, wait in waits.items() if "pipe_write" in wait]  # pipe_write, anon_pipe_write
    return str(pid) in writing or (waits.get(str(pid)) == "futex_do_wait" and bool(writing))


def test_one_sigterm_while_the_scheduler_is_starting_due_jobs_stops_the_daemon_cleanly(
    state_url: str, config: Config, customers: Customers
) -> None:
    """Finding 7: with short schedules one SIGTERM sometimes ended in JobLookupError or IndexError. The
    handler runs in the main thread, the scheduler's, and shut the scheduler down from inside its loop,
    halfway through the jobs it was starting. Here the loop is held there: its stderr is a pipe nobody reads
    yet (as a journal that throttles), and the loop is blocked logging that due jobs were skipped."""
    customers.add("u1")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        for n in range(100):
            config.connect(config.audience(f"Audience {n}", Customers.QUERY), destination)
        daemon = start_cli(state_url, "daemon", env={"SYNC_INTERVAL": "1s"})
        try:
            wait_for(lambda: _blocked_logging(daemon.pid), 60)
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.communicate()
    assert daemon.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1].endswith("INFO daemon stopped action=daemon_stopped")
    assert _leases(config) == 0


def test_sigterm_while_the_destination_answers_429_retry_after_60_exits_within_30s_and_loses_nothing(
    state_url: str, config: Config, customers: Customers, tmp_path: Path
) -> None:
    """Finding 7: with the destination answering 429 `Retry-After: 60`, the daemon took 301 s to stop."""
    customers.add(*USERS)
    log = tmp_path / "daemon.log"
    with EverflowServer() as everflow:
        config.connect(
            config.audience("VIP", Customers.QUERY),
            everflow_destination(config, everflow, rate_limit=10, max_in_flight=4),
        )
        with _started(state_url, log, "daemon", env={"SYNC_INTERVAL": "1h"}) as daemon:
            wait_for(lambda: _accepted(everflow) >= 8)
            everflow.fault(429, headers={"Retry-After": "60"}, times=10_000)
            wait_for(lambda: len(everflow.requests) > _accepted(everflow))  # a 429 was answered
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)  # the requirement is a time bound: 15 s, asserted generously
        assert daemon.returncode == 0
        assert "Traceback" not in log.read_text()
        sent = _accepted(everflow)
        assert 8 <= sent < len(USERS)
        assert _the_run(config) == ("interrupted", _pending(len(USERS) - sent), sent)  # each page recorded
        assert _leases(config) == 0

        everflow.clear_faults()
        finish = run_cli(state_url, "run")
        assert finish.returncode == 0, finish.stderr
        assert everflow.accepted == EVERYONE_ONCE


@pytest.mark.parametrize(
    ("command", "signum"),
    [("initial", signal.SIGINT), ("run", signal.SIGTERM), ("run", signal.SIGHUP)],
    ids=["initial-SIGINT", "run-SIGTERM", "run-SIGHUP"],
)
def test_a_signal_stops_a_one_shot_command_after_the_page_records_it_and_the_next_one_resumes(
    state_url: str, config: Config, customers: Customers, tmp_path: Path, command: str, signum: signal.Signals
) -> None:
    """Finding 8: Ctrl-C on `initial` printed a KeyboardInterrupt traceback and kept sending everything;
    SIGTERM killed `run` at once without recording the run or releasing the lease."""
    customers.add(*USERS)
    log = tmp_path / "command.log"
    with EverflowServer(delay=0.05) as everflow:
        config.connect(
            config.audience("VIP", Customers.QUERY),
            everflow_destination(config, everflow, rate_limit=10, max_in_flight=4),
        )
        with _started(state_url, log, command) as process:
            wait_for(lambda: _accepted(everflow) >= 8)
            process.send_signal(signum)
            process.wait(timeout=30)
        text = log.read_text()
        assert process.returncode == 128 + signum, text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
        sent = _accepted(everflow)
        assert sent < len(USERS)  # it stopped sending
        assert _the_run(config) == ("interrupted", _pending(len(USERS) - sent), sent)
        assert _leases(config) == 0

        again = run_cli(state_url, command)
        assert again.returncode == 0, again.stderr
        assert everflow.accepted == EVERYONE_ONCE


def test_sighup_reloads_the_daemons_configuration_and_it_keeps_running(
    state_url: str, config: Config, customers: Customers, tmp_path: Path
) -> None:
    """Finding 7: SIGHUP killed the daemon at once, with no log line and no run recorded."""
    customers.add("u1")
    log = tmp_path / "daemon.log"
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        config.connect(config.audience("VIP", Customers.QUERY), destination)
        env = {"SYNC_INTERVAL": "1h", "SYNC_RELOAD_INTERVAL": "1h"}  # only SIGHUP can make it look again
        with _started(state_url, log, "daemon", env=env) as daemon:
            wait_for(lambda: config.sql("SELECT count(*) FROM sync_runs")[0][0] == 1)
            later = config.audience("Later", Customers.QUERY)
            config.connect(later, destination, {"entered_event": "Later Entered"})  # unmapped: skipped
            daemon.send_signal(signal.SIGHUP)
            wait_for(
                lambda: config.sql("SELECT count(*) FROM sync_runs WHERE audience_id = :a", a=later)[0][0]
            )
            assert daemon.poll() is None  # still running
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    assert daemon.returncode == 0
    actions = _actions(log)
    assert "Traceback" not in log.read_text()
    assert actions.count("reload_requested") == 1 and actions.count("audience_scheduled") == 2
    assert actions[-1] == "daemon_stopped"
