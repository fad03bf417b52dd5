"""`initial --baseline` (issue 16 item 8): a move from Segment Engage records the destinations' current
members as accepted without sending anything; later runs send only what changed since. Both backends, the
sandbox's Everflow and Refersion over loopback."""

import contextlib
import os
import pty
import signal
import subprocess
import time

import pytest
import sqlalchemy as sa

from sync.runner import Options, Runner
from sync.sandbox import EverflowServer, RefersionServer
from sync.settings import Settings
from sync.sources import Sources
from tests.conftest import COMMAND, Config, Customers, cli_env, run_cli
from tests.test_e2e import everflow_destination, refersion_destination


def _run(engine: sa.Engine, options: Options) -> list[tuple[str | None, str, str | None]]:
    runner = Runner(engine, Sources(engine), Settings.from_env())
    try:
        return [(r.destination, r.outcome, r.error) for r in runner.run(options)]
    finally:
        runner.close()


def _outcomes(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT outcome FROM sync_runs ORDER BY id")))


def test_baseline_sends_nothing_and_the_next_run_sends_only_later_changes(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2", "u3")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        # Segment Engage created these affiliates: Refersion already holds the members
        held = {user: refersion.add_affiliate(f"{user}@example.com") for user in ("u1", "u2", "u3")}
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        config.connect(audience, refersion_destination(config, refersion, on_exit="disable"))

        baselined = _run(engine, Options(initial_only=True, baseline=True))

        assert sorted(baselined) == [("Everflow", "baseline", None), ("Refersion", "baseline", None)]
        assert everflow.requests == [] and refersion.requests == []
        assert _outcomes(engine) == ["baseline", "baseline"]
        assert _run(engine, Options(initial_only=True)) == []  # the initial sync is complete

        customers.move("u1", segment="other")
        customers.add("u4")
        changed = _run(engine, Options())

    assert sorted(changed) == [("Everflow", "ok", None), ("Refersion", "ok", None)]
    assert everflow.accepted == {("tid-u4", "7"): 1, ("tid-u1", "8"): 1}  # u4 entered, u1 exited
    # u1's affiliate id was never learned: found by email the first time its status changes
    paths = [(r.path.removeprefix("/v2/affiliate/"), r.json.get("email")) for r in refersion.requests]
    assert sorted(paths, key=str) == sorted(
        [("new", "u4@example.com"), ("search", None), ("get", None), ("status_change", None)], key=str
    )
    assert refersion.affiliates[held["u1"]]["status"] == "DISABLED"
    assert [refersion.affiliates[held[u]]["status"] for u in ("u2", "u3")] == ["ACTIVE", "ACTIVE"]


def test_a_connection_that_has_sent_before_is_not_baselined(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow:
        audience = config.audience("VIP", Customers.QUERY)
        destination = everflow_destination(config, everflow)
        config.connect(audience, destination)
        config.sql(  # an initial sync cut short after u1
            "INSERT INTO sync_state (audience_id, destination_id, user_id, member, traits, changes, "
            "accepted_at) VALUES (:a, :d, 'u1', true, '{}', 1, '2026-11-01 00:00:00.000000')",
            a=audience,
            d=destination,
        )
        [(name, outcome, error)] = _run(engine, Options(initial_only=True, baseline=True))

    assert (name, outcome) == ("Everflow", "failed")
    assert error == (
        "not baselined: audience 'VIP' (id 1) has synced to 'Everflow' before; "
        "finish its initial sync with `audience-sync initial`"
    )
    assert everflow.requests == []
    assert _outcomes(engine) == []  # nothing recorded


def test_the_command_previews_asks_for_yes_off_a_terminal_then_records(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow:
        config.connect(config.audience("VIP", Customers.QUERY), everflow_destination(config, everflow))

        unconfirmed = run_cli(state_url, "initial", "--baseline")
        assert unconfirmed.returncode == 2, unconfirmed.stderr
        assert "VIP -> Everflow: 2 member(s) to record as accepted; nothing is sent" in unconfirmed.stderr
        assert "nothing recorded: add --yes to baseline without a terminal" in unconfirmed.stderr
        assert _outcomes(engine) == []

        done = run_cli(state_url, "initial", "--baseline", "--yes")
        assert done.returncode == 0, done.stderr
        assert "VIP -> Everflow: baseline" in done.stderr
        assert _outcomes(engine) == ["baseline"]
        assert everflow.requests == []

        customers.add("u3")
        later = run_cli(state_url, "run")
        assert later.returncode == 0, later.stderr
    assert everflow.accepted == {("tid-u3", "7"): 1}
    assert run_cli(state_url, "initial", "--baseline", "--resend").returncode == 2  # one or the other


@pytest.mark.parametrize("key", ["ctrl-c", "ctrl-d"])
def test_the_prompt_aborts_on_ctrl_c_or_ctrl_d_and_the_preview_logs_no_run(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers, key: str
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow:
        config.connect(config.audience("VIP", Customers.QUERY), everflow_destination(config, everflow))
        leader, follower = pty.openpty()  # the prompt is asked on a terminal only
        process = subprocess.Popen(
            [COMMAND, "initial", "--baseline"],
            env=cli_env(state_url),
            stdin=follower,
            stdout=follower,
            stderr=follower,
            # a shell's Ctrl-C: SIGINT as Python takes it by default (a test runner's worker may ignore it)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
        )
        os.close(follower)
        shown = b""
        while b"[y/N]" not in shown:
            shown += os.read(leader, 4096)
        if key == "ctrl-c":
            # a person reads the prompt first: a signal between the prompt and the read waits for the next one
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            if not _exited(process, after=10):  # it came before the read: once more
                process.send_signal(signal.SIGINT)
        else:
            os.write(leader, b"\x04")  # end of input on an empty line
        code = process.wait(timeout=30)
        with contextlib.suppress(OSError):  # the terminal closed with the process
            while chunk := os.read(leader, 4096):
                shown += chunk
        os.close(leader)
    text = shown.decode(errors="replace")
    assert code == 2 and "aborted: nothing recorded" in text and "Traceback" not in text, text
    assert "VIP -> Everflow: 2 member(s) to record as accepted" in text
    assert "run_finished" not in text  # the preview records nothing, so it logs no run
    assert _outcomes(engine) == [] and everflow.requests == []


def _exited(process: subprocess.Popen[bytes], after: float) -> bool:
    try:
        process.wait(timeout=after)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_a_recorded_baseline_logs_one_run_and_counts_skipped_members(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow:
        unmapped = {"tracking_domain": everflow.url, "network_id": "1"}  # no event mapping: entries skipped
        config.connect(config.audience("VIP", Customers.QUERY), config.destination("E", "everflow", unmapped))
        done = run_cli(state_url, "initial", "--baseline", "--yes")
    assert done.returncode == 0, done.stderr
    assert "VIP -> E: 2 member(s) to record as accepted" in done.stderr  # not 0: skipped ones are recorded
    assert done.stderr.count("action=run_finished") == 1, done.stderr
