"""Everyday commands (issue 23 item 13): `db current` and `db history`, and read-only commands that keep
stderr for what they show."""

import pytest
from alembic.script import ScriptDirectory

from sync import database
from sync.sandbox import EverflowServer
from tests.conftest import Config, Customers, run_cli
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
