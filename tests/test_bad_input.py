"""The bad input catalogue: each kind of broken row, query or value, through the real `audience-sync` command.

Each case checks, on SQLite and on Postgres: the exit code, one clear message naming the row and the field,
no traceback, that a healthy audience on a healthy destination in the same configuration still synced (counted
by the loopback server), and that `audience-sync status --json` keeps the reason.
"""

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from tests.conftest import SLOW_QUERY, Config, Customers, run_cli
from tests.test_e2e import EVENTS, everflow_destination, refersion_destination

Status = dict[tuple[str, str], dict[str, Any]]


def clean(*results: subprocess.CompletedProcess[str]) -> None:
    """Expected errors print one line each: no traceback anywhere."""
    for result in results:
        assert "Traceback" not in result.stderr + result.stdout, result.stderr


def status(state_url: str, env: dict[str, str] | None = None) -> Status:
    result = run_cli(state_url, "status", "--json", env=env)
    assert result.returncode in (0, 1), result.stderr  # 1: a connection needs attention
    clean(result)
    return {(row["audience"], row["destination"]): row for row in json.loads(result.stdout)}


def broken(rows: Status, audience: str, destination: str, outcome: str, reason: str) -> None:
    """Status shows the connection's last run with that outcome and the reason in last_error."""
    row = rows[(audience, destination)]
    assert row["last_run"] is not None, row
    assert row["last_run"]["outcome"] == outcome, row
    assert reason in (row["last_error"] or ""), row


def raw_destination(
    config: Config,
    name: str,
    kind: str,
    settings: str,
    api_key: str | None = None,
    api_key_env: str | None = None,
) -> int:
    """A destinations row with its settings written as the operator typed them (any text)."""
    config.sql(
        "INSERT INTO destinations (name, kind, api_key, api_key_env, settings) "
        "VALUES (:name, :kind, :api_key, :api_key_env, :settings)",
        name=name,
        kind=kind,
        api_key=api_key,
        api_key_env=api_key_env,
        settings=settings,
    )
    return int(config.sql("SELECT id FROM destinations WHERE name = :name", name=name)[0][0])


# ------------------------------------------------------------------------------------------------------------
# destinations rows


def test_bad_destination_rows(backend: str, state_url: str, config: Config, customers: Customers) -> None:
    customers.add("u1", "u2")
    env = {"AS_TEST_EMPTY_KEY": ""}
    with EverflowServer() as everflow, RefersionServer() as refersion:
        good_everflow = everflow_destination(config, everflow, event_mapping={**EVENTS, "Probe Entered": 9})
        # loopback may be plain http, by address (Everflow above) or by name (this one)
        good_refersion = refersion_destination(config, refersion)
        config.sql(
            "UPDATE destinations SET settings = :s WHERE id = :id",
            id=good_refersion,
            s=json.dumps({"api_base": refersion.url.replace("127.0.0.1", "localhost") + "/v2"}),
        )
        healthy = config.audience("Healthy", Customers.QUERY)
        config.connect(healthy, good_everflow)
        config.connect(healthy, good_refersion)
        probe = config.audience("Probe", Customers.QUERY)
        config.connect(probe, good_everflow, {"entered_event": "Probe Entered"})  # a healthy sibling

        expected: dict[str, str] = {}  # destination name -> the message, as run, check and status show it

        def bad(name: str, kind: str, settings: str, message: str, **key: str) -> None:
            destination = raw_destination(config, name, kind, settings, **key)
            config.connect(probe, destination)
            expected[name] = f"destinations row id={destination} ({name!r}): {message}"

        malformed = '{"tracking_domain": "https://t.example.com", "network_id": 1,'
        if backend == "sqlite":
            bad("Malformed JSON", "everflow", malformed, "settings is not valid JSON (")
        else:  # JSONB refuses it at INSERT: the operator learns at once
            with pytest.raises(sa.exc.DBAPIError, match="invalid input syntax for type json"):
                raw_destination(config, "Malformed JSON", "everflow", malformed)
        bad("Not An Object", "everflow", "[1, 2]", "settings must be a JSON object, not list")
        bad(
            "Unknown Kind", "tapfiliate", "{}", "kind 'tapfiliate' is unknown (use 'everflow' or 'refersion')"
        )
        none_set = (
            "the Refersion API key must be 'publickey.secretkey' (none is set: fill api_key or api_key_env)"
        )
        bad("No Credential", "refersion", "{}", none_set)
        bad(
            "Unset Env",
            "refersion",
            "{}",
            "api_key_env names 'AS_TEST_NEVER_SET', which is not set or empty",
            api_key_env="AS_TEST_NEVER_SET",
        )
        bad(
            "Empty Env",
            "refersion",
            "{}",
            "api_key_env names 'AS_TEST_EMPTY_KEY', which is not set or empty",
            api_key_env="AS_TEST_EMPTY_KEY",
        )
        not_two_parts = (
            "the Refersion API key must be 'publickey.secretkey' "
            "(the key given is not two non-empty parts of plain ASCII around a '.')"
        )
        secrets = {
            "No Dot": "nodotsecret4711",
            "No Secret": "publichalf4711.",
            "No Public": ".secrethalf4711",
            "Not ASCII": "publichalf4711.sëcrethalf4711",
        }
        for name, api_key in secrets.items():
            bad(name, "refersion", "{}", not_two_parts, api_key=api_key)
        http = json.dumps({"tracking_domain": "http://example.com", "network_id": "1"})
        bad(
            "Plain HTTP",
            "everflow",
            http,
            "settings.tracking_domain: 'http://example.com' must use https:// "
            "(http is allowed only for loopback hosts)",
        )
        bad(
            "Plain HTTP Refersion",
            "refersion",
            json.dumps({"api_base": "http://api.refersion.com/v2"}),
            "settings.api_base: 'http://api.refersion.com/v2' must use https:// "
            "(http is allowed only for loopback hosts)",
            api_key="pub.sec",
        )

        everflow_base = {"tracking_domain": "https://t.example.com", "network_id": "1"}
        for name, settings, message in [
            (
                "Huge Rate",
                '"rate_limit": 1e400',
                "settings.rate_limit must be a number from 0.001 to 1,000,000",
            ),
            (
                "Tiny Rate",
                '"rate_limit": 1e-300',
                "settings.rate_limit must be a number from 0.001 to 1,000,000",
            ),
            ("Many In Flight", '"max_in_flight": 100000', "settings.max_in_flight must be a whole number"),
            (
                "Bad Port",
                '"tracking_domain": "http://localhost:abc"',
                "settings.tracking_domain: 'http://localhost:abc' is not a base URL",
            ),
            (
                "Unclosed IPv6",
                '"tracking_domain": "https://[::1"',
                "settings.tracking_domain: 'https://[::1' is not a base URL",
            ),
            (
                "URL With Password",
                '"tracking_domain": "https://ops:hunter2secret@t.example.com"',
                "settings.tracking_domain: the URL holds a user or password; remove it",
            ),
        ]:
            bad(name, "everflow", json.dumps(everflow_base)[:-1] + ", " + settings + "}", message)
        if backend == "sqlite":  # JSONB refuses NaN at INSERT
            nan = json.dumps(everflow_base)[:-1] + ', "timeout": NaN}'
            bad("NaN Timeout", "everflow", nan, "settings.timeout must be a number from 0.001 to 3,600")
        # a key read from a file ends in a newline: the blanks around a key are dropped
        config.sql("UPDATE destinations SET api_key = :k WHERE id = :id", k=" pub.sec\n", id=good_refersion)

        result = run_cli(state_url, "run", env=env)
        check = run_cli(state_url, "check", env=env)
        rows = status(state_url, env)

    clean(result, check)
    assert result.returncode == 1, result.stderr
    assert "hunter2secret" not in result.stderr + check.stdout + json.dumps(list(rows.values()), default=str)
    for name, message in expected.items():
        assert message in result.stderr, result.stderr
        assert f"Probe -> {name}: invalid ({message}" in result.stderr, name
        broken(rows, "Probe", name, "invalid", message)
    # the healthy audience, and the healthy sibling connection of the broken one, still synced
    assert everflow.accepted == {(f"tid-{u}", e): 1 for u in ("u1", "u2") for e in ("7", "9")}
    assert sorted(a["unique_merchant_id"] for a in refersion.affiliates.values()) == ["u1", "u2"]
    for destination in ("Everflow", "Refersion"):
        assert rows[("Healthy", destination)]["last_run"]["outcome"] == "ok"
        assert rows[("Healthy", destination)]["accepted_members"] == 2
    assert rows[("Probe", "Everflow")]["last_run"]["outcome"] == "ok"
    # a credential never shows, not even a malformed one
    everything = (
        result.stdout
        + result.stderr
        + check.stdout
        + check.stderr
        + json.dumps(list(rows.values()), default=str)
    )
    for api_key in secrets.values():
        assert api_key.strip(".") not in everything

    assert check.returncode == 2, check.stderr
    for message in expected.values():
        assert message in check.stdout, check.stdout
    assert f"{len(expected)} problem(s)" in check.stderr
    for healthy_id in (good_everflow, good_refersion):  # loopback http is allowed
        assert f"destinations row id={healthy_id} " not in check.stdout


def test_key_pasted_into_api_key_env_is_reported_without_its_value(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    """Finding 10: api_key_env holding the key itself, not a variable's name: no part of it is shown."""
    customers.add("u1")
    pasted = "pubPASTED4711.secPASTED4711\n"
    with EverflowServer() as everflow, RefersionServer() as refersion:
        healthy = config.audience("Healthy", Customers.QUERY)
        config.connect(healthy, everflow_destination(config, everflow))
        settings = json.dumps({"api_base": refersion.url + "/v2"})
        pasted_into = raw_destination(config, "Pasted", "refersion", settings, api_key_env=pasted)
        config.connect(healthy, pasted_into)
        outputs = [
            run_cli(state_url, *command_line, env={"SYNC_LOG_FORMAT": log_format})
            for command_line in (["check"], ["run"], ["status"], ["status", "--json"], ["explain", "u1"])
            for log_format in ("text", "json")
        ]
        rows = status(state_url)
    clean(*outputs)
    message = (
        f"destinations row id={pasted_into} ('Pasted'): api_key_env does not hold an environment variable "
        "name; put the key itself in the environment, not in this column"
    )
    assert message in outputs[0].stdout and message in outputs[2].stderr
    broken(rows, "Healthy", "Pasted", "invalid", message)
    assert everflow.accepted == {("tid-u1", "7"): 1} and refersion.requests == []
    with engine.connect() as conn:
        recorded = "\n".join(str(row) for row in conn.execute(sa.text("SELECT * FROM sync_runs")))
    assert message in recorded
    everything = recorded + "".join(o.stdout + o.stderr for o in outputs)
    assert "PASTED" not in everything  # in both halves of the key


# ------------------------------------------------------------------------------------------------------------
# audience queries


def test_bad_audience_queries(backend: str, state_url: str, config: Config, customers: Customers) -> None:
    customers.add("u1", "u2", "u3")
    before = config.sql("SELECT user_id, email, segment FROM customers ORDER BY user_id")
    env = {"SYNC_QUERY_TIMEOUT": "1s"}
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        config.connect(config.audience("Healthy", Customers.QUERY), destination)
        expected: dict[str, str] = {}  # audience name -> the message

        def bad(name: str, query: str, message: str) -> None:
            audience = config.audience(name, query)
            config.connect(audience, destination)
            expected[name] = f"audience {name!r} (id {audience}): {message}"

        syntax = 'near ",": syntax error' if backend == "sqlite" else 'syntax error at or near ","'
        bad("Syntax Error", "SELECT user_id,, email FROM customers", f"the query failed: {syntax}")
        bad(
            "No User Id",
            "SELECT email, first_name FROM customers",
            "the query returns no user_id column (it returns email, first_name)",
        )
        # writes smuggled past the wrapper the query runs in
        bad(
            "Break-out Delete",
            "SELECT user_id FROM customers) AS x; DELETE FROM customers; --",
            "the query failed: ",
        )
        bad(
            "Break-out Update",
            "SELECT user_id FROM customers) AS x; UPDATE customers SET segment = 'gone'; --",
            "the query failed: ",
        )
        if backend == "postgres":
            bad(
                "Delete CTE",
                "WITH d AS (DELETE FROM customers RETURNING user_id) SELECT user_id FROM d",
                "the query failed: WITH clause containing a data-modifying statement must be at the top",
            )
            bad(
                "Update CTE",
                "WITH u AS (UPDATE customers SET segment = 'gone' RETURNING user_id) SELECT user_id FROM u",
                "the query failed: WITH clause containing a data-modifying statement must be at the top",
            )
            config.sql("CREATE SEQUENCE counter")
            bad(  # a write from inside a SELECT: the READ ONLY transaction refuses it
                "Sequence Write",
                "SELECT user_id, nextval('counter') AS n FROM customers",
                "the query failed: cannot execute nextval() in a read-only transaction",
            )
        bad("Too Slow", SLOW_QUERY[backend], "the query failed: timed out (SYNC_QUERY_TIMEOUT)")

        started = time.monotonic()
        result = run_cli(state_url, "run", env=env)
        elapsed = time.monotonic() - started
        check = run_cli(state_url, "check", env=env)
        rows = status(state_url, env)

    clean(result, check)
    assert result.returncode == 1, result.stderr
    # the slow query runs for minutes when nothing stops it
    assert elapsed < 60, f"the 1s timeout was not enforced: the run took {elapsed:.1f}s"
    for name, message in expected.items():
        assert message in result.stderr, result.stderr
        assert f"{name} -> Everflow: failed" in result.stderr, name
        broken(rows, name, "Everflow", "failed", message)
        assert rows[(name, "Everflow")]["members"] == 0
    # nothing was written by the smuggled statements
    assert config.sql("SELECT user_id, email, segment FROM customers ORDER BY user_id") == before
    # only the healthy audience sent anything, once per member
    assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u2", "7"): 1, ("tid-u3", "7"): 1}
    assert rows[("Healthy", "Everflow")]["last_run"]["outcome"] == "ok"

    assert check.returncode == 2, check.stderr
    for name, message in expected.items():
        # check runs each query with LIMIT 0: what happens only while rows are read is found by a run
        if name not in ("Too Slow", "Sequence Write"):
            assert message in check.stdout, check.stdout


def test_write_smuggled_past_the_read_only_transaction_is_refused(
    state_url: str, config: Config, customers: Customers
) -> None:
    """Ending the read-only transaction from inside the query must not open a way to write."""
    customers.add("u1", "u2", "u3")
    before = config.sql("SELECT user_id, email, segment FROM customers ORDER BY user_id")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        # this audience does not read customers, so it syncs whatever the broken one does to that table
        healthy = config.audience("Healthy", "SELECT 'h1' AS user_id, 'tid-h1' AS transaction_id")
        config.connect(healthy, destination)
        smuggler = config.audience(
            "Commit Break-out", "SELECT user_id FROM customers) AS x; COMMIT; DELETE FROM customers; --"
        )
        config.connect(smuggler, destination)
        message = f"audience 'Commit Break-out' (id {smuggler}): the query failed: "

        result = run_cli(state_url, "run")
        after_run = config.sql("SELECT user_id, email, segment FROM customers ORDER BY user_id")
        assert after_run == before, f"`run` let the audience query write to customers:\n{result.stderr}"
        check = run_cli(state_url, "check")
        after_check = config.sql("SELECT user_id, email, segment FROM customers ORDER BY user_id")
        assert after_check == before, f"`check` let the audience query write to customers:\n{check.stderr}"
        rows = status(state_url)

    clean(result, check)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert check.returncode == 2, check.stdout + check.stderr
    assert message in check.stdout, check.stdout
    broken(rows, "Commit Break-out", "Everflow", "failed", message)
    assert everflow.accepted == {("tid-h1", "7"): 1}
    assert rows[("Healthy", "Everflow")]["last_run"]["outcome"] == "ok"


def test_null_and_duplicate_user_ids_are_counted(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    config.sql(
        "INSERT INTO customers (user_id, email, first_name, last_name, transaction_id, segment) VALUES "
        "(NULL, 'null@example.com', 'No', 'Id', 'tid-null', 'odd'), "
        "('', 'empty@example.com', 'Empty', 'Id', 'tid-empty', 'odd')"
    )
    with EverflowServer() as everflow:
        destination = everflow_destination(
            config, everflow, event_mapping={**EVENTS, "Nullable Entered": 11, "Doubled Entered": 12}
        )
        config.connect(config.audience("Healthy", Customers.QUERY), destination)
        nullable = config.audience("Nullable", Customers.QUERY.replace("= 'vip'", "IN ('vip', 'odd')"))
        config.connect(nullable, destination, {"entered_event": "Nullable Entered"})
        doubled_query = (
            Customers.QUERY + " UNION ALL SELECT user_id, 'other-' || email, first_name, last_name, "
            "transaction_id FROM customers WHERE segment = 'vip'"
        )
        doubled = config.audience("Doubled", doubled_query)
        config.connect(doubled, destination, {"entered_event": "Doubled Entered"})

        result = run_cli(state_url, "run")
        rows = status(state_url)

    clean(result)
    # skipped and counted, not an error: the run is good
    assert result.returncode == 0, result.stderr
    assert (
        f"audience 'Nullable' (id {nullable}): 2 members "
        "(2 null user_ids, 0 duplicates, 0 user_ids over 1024 bytes)" in result.stderr
    )
    assert (
        f"audience 'Doubled' (id {doubled}): 2 members "
        "(0 null user_ids, 2 duplicates, 0 user_ids over 1024 bytes)" in result.stderr
    )
    runs = config.sql(
        "SELECT audience_id, outcome, members, accepted, null_user_ids, duplicate_user_ids FROM sync_runs "
        "WHERE audience_id IN (:n, :d) ORDER BY audience_id",
        n=nullable,
        d=doubled,
    )
    assert [tuple(r) for r in runs] == [(nullable, "ok", 2, 2, 2, 0), (doubled, "ok", 2, 2, 0, 2)]
    # every member sent once per connection; the rows without a user_id were not sent at all
    assert everflow.accepted == {(f"tid-{u}", e): 1 for u in ("u1", "u2") for e in ("7", "11", "12")}
    assert len(everflow.requests) == 6
    for audience in ("Healthy", "Nullable", "Doubled"):
        assert rows[(audience, "Everflow")]["last_run"]["outcome"] == "ok"
        assert rows[(audience, "Everflow")]["accepted_members"] == 2


# ------------------------------------------------------------------------------------------------------------
# audience keys


def test_bad_colliding_and_changed_keys(state_url: str, config: Config, customers: Customers) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow, event_mapping={**EVENTS, "Keyed Entered": 13})
        healthy = config.audience("Healthy", Customers.QUERY)
        config.connect(healthy, destination)
        empty = config.audience("!!!", Customers.QUERY)
        upper = config.audience("VIP Customers", Customers.QUERY)
        lower = config.audience("vip customers", Customers.QUERY)
        keyed = config.audience("Order Completed", Customers.QUERY)
        for audience in (empty, upper, lower):
            config.connect(audience, destination)
        config.connect(keyed, destination, {"entered_event": "Keyed Entered"})
        expected = {
            "!!!": f"audiences row id={empty} ('!!!'): key '' (from name) is not snake_case; "
            "set audiences.key by hand",
            "VIP Customers": f"audience 'VIP Customers' (id {upper}): key 'vip_customers' is shared by "
            "audiences 'VIP Customers', 'vip customers'; set audiences.key",
            "vip customers": f"audience 'vip customers' (id {lower}): key 'vip_customers' is shared by "
            "audiences 'VIP Customers', 'vip customers'; set audiences.key",
        }

        first = run_cli(state_url, "run")
        clean(first)
        assert first.returncode == 1, first.stderr
        assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u1", "13"): 1}
        assert config.sql("SELECT key FROM audiences WHERE id = :id", id=keyed)[0][0] == "order_completed"

        config.sql("UPDATE audiences SET key = 'something_else' WHERE id = :id", id=keyed)
        expected["Order Completed"] = (
            f"audience 'Order Completed' (id {keyed}): key changed from 'order_completed' to "
            "'something_else' after syncing to 'Everflow'; set audiences.key back to 'order_completed'"
        )
        # a new audience whose name gives the key the synced one stored: the newcomer is refused
        newcomer = config.audience("HEALTHY!", Customers.QUERY)
        config.connect(newcomer, destination)
        expected["HEALTHY!"] = (
            f"audience 'HEALTHY!' (id {newcomer}): key 'healthy' (from name) belongs to audience 'Healthy' "
            f"(id {healthy}); set audiences.key"
        )
        customers.add("u2")
        second = run_cli(state_url, "run")
        check = run_cli(state_url, "check")
        rows = status(state_url)

    clean(second, check)
    assert second.returncode == 1, second.stderr
    for name, message in expected.items():
        assert message in second.stderr, second.stderr
        broken(rows, name, "Everflow", "invalid", message)
        assert message in check.stdout, check.stdout
    assert check.returncode == 2, check.stderr
    # the healthy audience got its new member; nothing went out under the bad or edited keys
    assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u2", "7"): 1, ("tid-u1", "13"): 1}
    assert rows[("Healthy", "Everflow")]["last_run"]["outcome"] == "ok"
    assert rows[("Order Completed", "Everflow")]["accepted_members"] == 1


# ------------------------------------------------------------------------------------------------------------
# a disabled destination


def test_connection_to_disabled_destination_is_skipped(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        good = everflow_destination(config, everflow)
        paused = refersion_destination(config, refersion)
        # disabled, and broken too: a disabled row is not validated, so it cannot fail anything
        config.sql("UPDATE destinations SET enabled = false, api_key = NULL WHERE id = :id", id=paused)
        healthy = config.audience("Healthy", Customers.QUERY)
        config.connect(healthy, good)
        config.connect(healthy, paused)
        only_paused = config.audience("Only Paused", Customers.QUERY)
        config.connect(only_paused, paused)

        result = run_cli(state_url, "run")
        check = run_cli(state_url, "check")
        rows = status(state_url)

    clean(result, check)
    assert result.returncode == 0, result.stderr
    assert f"audience 'Healthy' (id {healthy}): destination 'Refersion' is disabled; skipped" in result.stderr
    assert f"audience 'Only Paused' (id {only_paused}): destination 'Refersion' is disabled; skipped" in (
        result.stderr
    )
    assert refersion.requests == []
    assert everflow.accepted == {("tid-u1", "7"): 1}
    assert config.sql("SELECT count(*) FROM sync_runs WHERE destination_id = :id", id=paused)[0][0] == 0
    assert check.returncode == 0, check.stdout + check.stderr
    for audience in ("Healthy", "Only Paused"):
        row = rows[(audience, "Refersion")]
        assert row["enabled"] is False and row["last_run"] is None and row["last_error"] is None, row
    assert rows[("Healthy", "Everflow")]["last_run"]["outcome"] == "ok"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # Postgres refuses such values
def test_enabled_holding_text_on_sqlite_is_read_as_sql_reads_it(
    state_url: str, config: Config, customers: Customers
) -> None:
    """What a sqlite3 shell user types ('false', 'true') is kept as text. Every reader takes it as SQL does
    (`enabled = 1`: not enabled), not as Python would (a non-empty string: enabled), and check names it."""
    customers.add("u1")
    with EverflowServer() as everflow, EverflowServer() as paused:
        good = everflow_destination(config, everflow)
        off = config.destination(
            "Paused", "everflow", {"tracking_domain": paused.url, "network_id": "1", "event_mapping": EVENTS}
        )
        on = config.audience("On", Customers.QUERY)
        config.connect(on, good)
        config.connect(on, off)
        stopped = config.audience("Off", Customers.QUERY)
        config.connect(stopped, good)
        typed = config.audience("Typed", Customers.QUERY)
        config.connect(typed, good)
        config.sql("UPDATE destinations SET enabled = 'false' WHERE id = :id", id=off)
        config.sql("UPDATE audiences SET enabled = 'false' WHERE id = :id", id=stopped)
        config.sql("UPDATE audience_destinations SET enabled = 'true' WHERE audience_id = :id", id=typed)

        result = run_cli(state_url, "run")
        check = run_cli(state_url, "check")
        rows = status(state_url)

    clean(result, check)
    assert result.returncode == 0, result.stderr
    assert paused.requests == []
    assert everflow.accepted == {("tid-u1", "7"): 1}  # from 'On' alone
    assert config.sql("SELECT count(*) FROM sync_runs WHERE audience_id = :id", id=stopped)[0][0] == 0
    assert f"audience 'On' (id {on}): destination 'Paused' is disabled; skipped" in result.stderr
    assert [(a, d) for (a, d), row in rows.items() if row["enabled"]] == [("On", "Everflow")]
    assert check.returncode == 2
    assert check.stdout.splitlines() == [
        f"destinations row id={off}: enabled holds 'false'; set it to 1 or 0",
        f"audiences row id={stopped}: enabled holds 'false'; set it to 1 or 0",
        f"audience_destinations row audience_id={typed}, destination_id={good}: enabled holds 'true'; "
        "set it to 1 or 0",
    ]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # elsewhere foreign keys forbid it
def test_connection_to_a_missing_destination_is_named(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        healthy = config.audience("Healthy", Customers.QUERY)
        config.connect(healthy, everflow_destination(config, everflow))
        gone = config.destination("Gone", "everflow", {"tracking_domain": everflow.url, "network_id": "1"})
        config.connect(healthy, gone)
        with sqlite3.connect(sa.make_url(state_url).database or "") as shell:  # foreign keys off by default
            shell.execute("DELETE FROM destinations WHERE id = ?", (gone,))

        result = run_cli(state_url, "run")
        check = run_cli(state_url, "check")
        rows = status(state_url)
        table = run_cli(state_url, "status", env={"COLUMNS": "250"})

    clean(result, check, table)
    assert table.returncode == 1 and f"id {gone} (missing)" in table.stdout, table.stdout
    assert re.search(rf"Healthy\s+id {gone} \(missing\)\s+invalid", table.stdout), table.stdout
    assert "disabled" not in table.stdout  # a missing destination is not a disabled one
    message = (
        f"audience_destinations row ('Healthy', destination_id={gone}): no destinations row has that id "
        "(deleted while foreign keys were off?); delete this row"
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert check.returncode == 2 and message in check.stdout, check.stdout
    assert everflow.accepted == {("tid-u1", "7"): 1}  # the audience's other connection synced
    assert rows[("Healthy", "Everflow")]["last_run"]["outcome"] == "ok"
    assert any(message in (row["last_error"] or "") for row in rows.values()), rows


# ------------------------------------------------------------------------------------------------------------
# trait values


HUGE = ("Zoë 東京 🚀 " + "x" * 90 + "\n")[:100] * 10_000  # 1,000,000 characters
NAME = "Zoë 東京 🚀"
USER = "zoë-東京-🚀"
TID = "tid-Zoë-東京-🚀"


def test_huge_and_non_ascii_trait_values_arrive_intact(
    state_url: str, config: Config, customers: Customers
) -> None:
    assert len(HUGE) == 1_000_000
    customers.add("u1")
    config.sql("ALTER TABLE customers ADD COLUMN notes TEXT")
    config.sql(
        "INSERT INTO customers (user_id, email, first_name, last_name, transaction_id, segment, notes) "
        "VALUES (:u, 'zoe@example.com', :n, :n, :t, 'world', :notes)",
        u=USER,
        n=NAME,
        t=TID,
        notes=HUGE,
    )
    query = (
        "SELECT user_id, email, first_name, last_name, transaction_id, notes FROM customers "
        "WHERE segment = 'world'"
    )
    with (
        EverflowServer() as everflow,
        RefersionServer() as refersion,
        SegmentServer(api_key="seg-key") as segment,
    ):
        everflow_id = everflow_destination(config, everflow)
        refersion_id = refersion_destination(config, refersion)
        segment_id = config.destination(
            "Segment",
            "everflow",
            {"transport": "segment", "endpoint": segment.url + "/v1/batch", "network_id": "1"},
            api_key="seg-key",
        )
        config.connect(config.audience("Healthy", Customers.QUERY), everflow_id)
        worldwide = config.audience("Worldwide", query)
        for destination in (everflow_id, refersion_id, segment_id):
            config.connect(worldwide, destination)

        result = run_cli(state_url, "run")
        rows = status(state_url)

    clean(result)
    assert result.returncode == 0, result.stderr
    assert everflow.accepted == {("tid-u1", "7"): 1, (TID, "7"): 1}
    [affiliate] = refersion.affiliates.values()
    assert (affiliate["first_name"], affiliate["last_name"], affiliate["unique_merchant_id"]) == (
        NAME,
        NAME,
        USER,
    )
    [message] = segment.messages
    assert message["userId"] == USER
    traits = message["context"]["traits"]  # an Everflow destination over Segment takes track calls
    assert traits["notes"] == HUGE
    assert (traits["first_name"], traits["transaction_id"]) == (NAME, TID)
    assert message["context"]["referrer"] == {"type": "everflow", "id": TID}

    stored = config.sql(
        "SELECT destination_id, user_id, traits FROM sync_state WHERE audience_id = :a "
        "ORDER BY destination_id",
        a=worldwide,
    )
    assert [(d, u) for d, u, _ in stored] == [(everflow_id, USER), (refersion_id, USER), (segment_id, USER)]
    for _, _, traits in stored:
        loaded = json.loads(traits)
        assert loaded["notes"] == HUGE
        assert (loaded["first_name"], loaded["last_name"], loaded["transaction_id"]) == (NAME, NAME, TID)
    for destination in ("Everflow", "Refersion", "Segment"):
        assert rows[("Worldwide", destination)]["last_run"]["outcome"] == "ok"
        assert rows[("Worldwide", destination)]["accepted_members"] == 1
    assert rows[("Healthy", "Everflow")]["accepted_members"] == 1


@pytest.mark.parametrize("source", ["in place", "another database"])
def test_nan_and_infinite_traits_arrive_as_null(
    backend: str, state_url: str, config: Config, customers: Customers, tmp_path: Path, source: str
) -> None:
    non_finite = {  # what each database can hold
        "postgres": "CAST('NaN' AS float8) AS nan, CAST('Infinity' AS float8) AS big, "
        "CAST('-Infinity' AS float8) AS small",
        "sqlite": "1e308 * 10 AS big, -1e308 * 10 AS small",
    }
    env: dict[str, str] = {}
    if source == "another database":  # rows are streamed and their traits written by audience-sync
        env["SYNC_SOURCE_URL"] = f"sqlite:///{tmp_path / 'warehouse.db'}"
        warehouse = sa.create_engine(env["SYNC_SOURCE_URL"])
        Customers(warehouse).add("u1")
        warehouse.dispose()
        backend = "sqlite"
    customers.add("u1")
    query = f"SELECT user_id, transaction_id, {non_finite[backend]} FROM customers"
    with SegmentServer(api_key="seg-key") as segment:
        destination = config.destination(
            "Segment", "everflow", {"transport": "segment", "endpoint": segment.url}, api_key="seg-key"
        )
        config.connect(config.audience("Scores", query), destination)
        preview = run_cli(state_url, "run", "--dry-run", env=env)
        result = run_cli(state_url, "run", env=env)

    clean(result, preview)
    assert result.returncode == 0, result.stderr
    # JSON has no NaN or infinities: null (README "How values are sent")
    expected = {"big": None, "small": None} | ({"nan": None} if "nan" in query else {})
    [message] = segment.messages
    assert {k: message["context"]["traits"][k] for k in expected} == expected  # track: traits in context
    strict = json.loads(preview.stdout, parse_constant=lambda token: pytest.fail(f"{token} in the preview"))
    assert {k: strict["message"]["context"]["traits"][k] for k in expected} == expected


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # Postgres refuses such bytes as text
def test_bytes_where_text_belongs_fail_only_their_audience(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        # a comment on the query's last line must not swallow what audience-sync wraps around it
        config.connect(config.audience("Healthy", Customers.QUERY + " -- the VIPs"), destination)
        # text that is not UTF-8 (bytes as user ids are written in base64: README "How values are sent")
        blob_ids = config.audience(
            "Blob Ids", "SELECT CAST(X'FF00FE' AS TEXT) AS user_id, 'tid-b' AS transaction_id"
        )
        config.connect(blob_ids, destination)
        config.sql("INSERT INTO audiences (name, query) VALUES (X'426c6f62', 'SELECT 1 AS user_id')")
        blob_name = int(config.sql("SELECT max(id) FROM audiences")[0][0])
        config.connect(blob_name, destination)

        result = run_cli(state_url, "run")
        rows = status(state_url)
        table = run_cli(state_url, "status", env={"COLUMNS": "250"})

    clean(result, table)
    assert table.returncode == 1 and "b'Blob'" in table.stdout, table.stdout
    assert result.returncode == 1, result.stderr
    assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u2", "7"): 1}
    assert rows[("Healthy", "Everflow")]["last_run"]["outcome"] == "ok"
    not_text = "the query returned a value that is not UTF-8 text (staged in column user_id)"
    assert f"Blob Ids' (id {blob_ids}) -> Everflow: failed" in result.stderr
    broken(rows, "Blob Ids", "Everflow", "failed", not_text)
    assert f"audiences row id={blob_name} (b'Blob'): name holds bytes data, not text" in result.stderr


# ------------------------------------------------------------------------------------------------------------
# database URLs

# Each hides the password `Pw4711@Zq9` (or `Pw4711Zq9`): no part of it may be printed.
BAD_URLS = [
    "postgresql://app:Pw4711@Zq9@db.invalid/state",  # an unescaped @: SQLAlchemy reads host `Zq9@db.invalid`
    "postgresql://app:Pw4711@Zq9/x@db.invalid/state",  # ... host `Zq9`, database `x@db.invalid/state`
    "postgresql://app:Pw4711@Zq9:5432@db.invalid/state",  # ... port `5432@db.invalid`
    "postgresql://app:Pw4711Zq9@db.invalid:abc/state",  # a port that is not a number
]


@pytest.mark.parametrize("variable", ["SYNC_DATABASE_URL", "SYNC_SOURCE_URL"])
def test_database_url_that_does_not_parse_is_one_line_without_any_part_of_the_password(
    state_url: str, variable: str
) -> None:
    """Finding 9: a traceback (port) or the rest of the password (an unescaped @) was printed."""
    commands = (
        [["status"], ["run"], ["db", "upgrade"]] if variable == "SYNC_DATABASE_URL" else [["check"], ["run"]]
    )
    for url in BAD_URLS:
        for command_line in commands:
            done = run_cli(state_url, *command_line, env={variable: url}, timeout=30)
            clean(done)
            assert done.returncode == 2, (url, command_line, done.stderr)
            last = done.stderr.splitlines()[-1]
            what = "database" if variable == "SYNC_DATABASE_URL" else "source"
            assert last.startswith(f"audience-sync: cannot use {what} URL postgresql://***@db.invalid"), last
            assert "it does not parse" in last
            for part in ("Pw4711", "Zq9"):
                assert part not in done.stdout + done.stderr, (url, command_line, done.stderr)
            if variable == "SYNC_DATABASE_URL":
                assert len(done.stderr.splitlines()) == 1, done.stderr
