"""Everyday commands (issue 23 item 13): `db current` and `db history`, and read-only commands that keep
stderr for what they show."""

import contextlib
import json
import re
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory

from sync import database
from sync.sandbox import EverflowServer, RefersionServer
from tests.conftest import Config, Customers, free_port, run_cli, start_cli, wait_for
from tests.test_e2e import everflow_destination
from tests.test_migrations import alembic


def _head(url: str) -> str:
    head = ScriptDirectory.from_config(database.alembic_config(url)).get_current_head()
    assert head is not None
    return head


def test_db_current_names_the_revision_and_whether_it_is_the_newest(empty_url: str) -> None:
    if path := database.sqlite_file(empty_url):
        path.touch()  # an empty SQLite database
    not_migrated = run_cli(empty_url, "db", "current")
    assert not_migrated.returncode == 1, not_migrated.stderr
    assert not_migrated.stdout.startswith("none: ") and "run: audience-sync db upgrade" in not_migrated.stdout

    head = _head(empty_url)
    alembic(empty_url, "upgrade", "0007")
    behind = run_cli(empty_url, "db", "current")
    assert behind.stdout == f"0007 (head is {head}: run audience-sync db upgrade)\n", behind.stderr

    database.upgrade(empty_url)
    current = run_cli(empty_url, "db", "current")
    assert (current.returncode, current.stdout, current.stderr) == (0, f"{head} (head)\n", "")


def test_db_current_of_a_missing_file_says_so_and_creates_nothing(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "nothere.db"  # type: ignore[operator]
    missing = run_cli(f"sqlite:///{path}", "db", "current")
    assert missing.returncode == 2 and missing.stderr == (
        f"audience-sync: no state database at {path}: run `audience-sync db upgrade`\n"
    )
    assert not path.exists()


def test_db_history_lists_every_migration_newest_first(state_url: str) -> None:
    shown = run_cli(state_url, "db", "history")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split(",")[0].endswith(f" -> {_head(state_url)} (head)")
    assert lines[-1].startswith("<base> -> 0001, ") and any(line.startswith("0007 -> 0008") for line in lines)


def test_read_only_commands_print_no_log_line_and_a_run_names_the_state_database(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        config.connect(config.audience("VIP", Customers.QUERY), everflow_destination(config, everflow))
        ran = run_cli(state_url, "run")
    assert ran.returncode == 0 and "state database: " in ran.stderr, ran.stderr
    for command in (["status"], ["audiences"], ["destinations"], ["runs"], ["explain", "u1"]):
        shown = run_cli(state_url, *command)
        assert shown.returncode == 0 and shown.stderr == "", (command, shown.stderr)


def test_the_readme_worked_example_runs_as_written_against_the_sandbox(tmp_path: Path) -> None:
    """The README's SQL and key, with only the sandbox's ports moved to free ones (tests run side by side)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme[readme.index("## Worked example") : readme.index("## Commands")]
    sql = example.split("```sql\n", 1)[1].split("```", 1)[0]
    [key] = re.findall(r"export REFERSION_API_KEY='([^']*)'", example)
    assert "http://127.0.0.1:8870" in sql and "http://127.0.0.1:8871/v2" in sql  # `audience-sync sandbox`'s
    url = f"sqlite:///{tmp_path / 'audience-sync.db'}"
    database.upgrade(url)
    with EverflowServer() as everflow, RefersionServer() as refersion:
        moved = sql.replace("http://127.0.0.1:8870", everflow.url).replace(
            "http://127.0.0.1:8871", refersion.url
        )
        with contextlib.closing(sqlite3.connect(tmp_path / "audience-sync.db")) as shell:
            shell.executescript(moved)
        env = {"REFERSION_API_KEY": key}
        dry = run_cli(url, "initial", "--dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        shown = [json.loads(line) for line in dry.stdout.splitlines()]
        assert sorted((m["destination"], m["message"]["userId"]) for m in shown) == [
            ("Everflow", "c1"),
            ("Everflow", "c2"),
            ("Refersion", "c1"),
            ("Refersion", "c2"),
        ]
        done = run_cli(url, "initial", env=env)
        assert done.returncode == 0, done.stderr
    assert everflow.accepted == {("tx-1", "5"): 1, ("tx-2", "5"): 1}
    assert sorted(a["unique_merchant_id"] for a in refersion.affiliates.values()) == ["c1", "c2"]


def _listening_on(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (IPv4), as /proc/net/tcp writes them."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return {
        local.split(":")[0]
        for _, local, _, state, *_ in rows
        if state == "0A" and int(local.split(":")[1], 16) == port
    }


@pytest.mark.parametrize(("address", "bound"), [(None, "0100007F"), ("0.0.0.0", "00000000")])
def test_the_metrics_listen_on_loopback_unless_an_address_is_given(
    state_url: str, address: str | None, bound: str
) -> None:
    port = free_port()
    env = {"SYNC_METRICS_PORT": str(port), **({"SYNC_METRICS_ADDRESS": address} if address else {})}
    daemon = start_cli(state_url, "daemon", env=env)
    try:
        wait_for(lambda: bool(_listening_on(port)), 30)
        assert _listening_on(port) == {bound}  # 127.0.0.1 by default; every interface when asked
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, stderr


def test_a_metrics_address_that_is_no_ip_address_is_one_line(state_url: str) -> None:
    refused = run_cli(
        state_url, "daemon", env={"SYNC_METRICS_PORT": "9464", "SYNC_METRICS_ADDRESS": "localhost"}
    )
    assert refused.returncode == 2 and refused.stderr == (
        "audience-sync: SYNC_METRICS_ADDRESS: 'localhost' is not an IP address (127.0.0.1, the default, or "
        "0.0.0.0 for every interface)\n"
    )


def test_a_variable_name_written_with_a_dollar_is_answered_drop_the_dollar(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    audience = config.audience("VIP", Customers.QUERY)
    settings = {"api_base": "https://api.refersion.com/v2"}
    config.connect(
        audience, config.destination("Refersion", "refersion", settings, api_key_env="$REFERSION_KEY")
    )
    checked = run_cli(state_url, "check", env={"REFERSION_KEY": "pub.sec"})
    assert checked.returncode == 2, checked.stderr
    assert (
        "destinations row id=1 ('Refersion'): api_key_env starts with a $: drop it, the column holds the "
        "variable's name alone"
    ) in checked.stdout
    assert "pub.sec" not in checked.stdout + checked.stderr
