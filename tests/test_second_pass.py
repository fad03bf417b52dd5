"""Reliability, second pass (issue 13): each test is named after the finding it pins down.

The runner in process against the sandbox's emulation (the real command where its output or another command
is the point), on SQLite and Postgres unless a finding is about one backend.
"""

import json
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from sync.runner import Options, Runner
from sync.sandbox import SegmentServer
from sync.settings import Settings
from sync.sources import Sources
from tests.conftest import Config, Customers, run_cli, sync_in_process

FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "max_attempts": 2, "rate_limit": 1000}


def segment_destination(
    config: Config, segment: SegmentServer, kind: str = "refersion", **settings: Any
) -> int:
    """A destination over the Segment transport; a Refersion kind sends identify calls."""
    base = {"transport": "segment", "endpoint": segment.url + "/v1/identify", **FAST, **settings}
    return config.destination("Segment", kind, base, api_key=segment.api_key)


def accepted_values(segment: SegmentServer) -> Counter[tuple[str, bool]]:
    return Counter((m["userId"], m["traits"]["vip"]) for m in segment.messages)


def test_finding_1_the_same_refusal_for_every_request_stops_the_destination_and_loses_nothing(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add(*[f"u{i:02d}" for i in range(20)])
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        [initial] = sync_in_process(engine, segment, initial_only=True)
        assert initial.outcome == "ok", initial.error
        customers.move(*[f"u{i:02d}" for i in range(10)], segment="lapsed")  # 10 exits
        customers.add(*[f"n{i:02d}" for i in range(10)])  # 10 entries
        # a wrong endpoint path: every request answered 404 (Segment's partner page: 4xx with a message)
        segment.fault(404, '{"message": "Not Found"}', times=10_000)

        [refused] = sync_in_process(engine, segment)

        assert refused.outcome == "failed"
        assert "the first 10 requests were all refused alike (HTTP 404: Not Found)" in str(refused.error)
        assert "20 changes stay pending" in str(refused.error)
        assert config.sql("SELECT count(*) FROM sync_rejections") == [(0,)]
        assert config.sql("SELECT count(*) FROM sync_state WHERE member = true") == [(20,)]
        [(pending, outcome)] = config.sql("SELECT pending, outcome FROM sync_runs ORDER BY id DESC LIMIT 1")
        assert (pending, outcome) == (20, "failed")

        segment.clear_faults()  # the operator fixed the endpoint
        segment.messages.clear()
        [fixed] = sync_in_process(engine, segment)

        assert fixed.outcome == "ok", fixed.error
        expected = {(f"u{i:02d}", False): 1 for i in range(10)} | {(f"n{i:02d}", True): 1 for i in range(10)}
        assert accepted_values(segment) == expected


def test_finding_1_refusals_alike_with_nothing_accepted_stay_pending_however_few(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2", "u3")
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        assert [r.outcome for r in sync_in_process(engine, segment, initial_only=True)] == ["ok"]
        customers.move("u2", "u3", segment="lapsed")
        segment.fault(404, '{"message": "Not Found"}', times=2)  # 2 exits, below the 10 that stop it
        [refused] = sync_in_process(engine, segment)
        assert refused.outcome == "failed"
        assert "refused (HTTP 404: Not Found) while nothing was accepted" in str(refused.error)
        assert config.sql("SELECT count(*) FROM sync_rejections") == [(0,)]
        assert config.sql("SELECT count(*) FROM sync_state WHERE member = true") == [(3,)]
        segment.messages.clear()
        assert [r.outcome for r in sync_in_process(engine, segment)] == ["ok"]
        assert accepted_values(segment) == {("u2", False): 1, ("u3", False): 1}


def test_finding_1_refused_users_are_rejected_once_the_destination_accepted_one_in_the_batch(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add(*[f"a{i:02d}" for i in range(10)], *[f"b{i:02d}" for i in range(30)])
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        segment.fault(400, '{"message": "Missing email address"}', times=10)  # 10 alike, about 10 users
        [done] = sync_in_process(engine, segment, initial_only=True)
        assert done.outcome == "ok", done.error
        assert config.sql("SELECT count(*) FROM sync_rejections") == [(10,)]
        assert config.sql("SELECT count(*) FROM sync_state WHERE member = true") == [(30,)]


def test_finding_2_initial_resend_delivers_the_exits_still_pending(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2", "u3", "u4", "u5")
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        assert [r.outcome for r in sync_in_process(engine, segment, initial_only=True)] == ["ok"]
        customers.move("u4", "u5", segment="lapsed")
        segment.fault(503, times=10_000)  # the destination is down while they leave
        assert [r.outcome for r in sync_in_process(engine, segment)] == ["failed"]
        segment.clear_faults()
        segment.messages.clear()

        [resent] = sync_in_process(engine, segment, initial_only=True, resend=True)

        assert resent.outcome == "ok", resent.error
        assert accepted_values(segment) == {
            ("u1", True): 1,
            ("u2", True): 1,
            ("u3", True): 1,
            ("u4", False): 1,
            ("u5", False): 1,
        }
        assert dict(config.sql("SELECT user_id, member FROM sync_state")) == {
            "u1": True,
            "u2": True,
            "u3": True,
            "u4": False,
            "u5": False,
        }


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_finding_3_what_an_audience_query_sets_does_not_outlive_it(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    poison = (
        "SELECT user_id, set_config('default_transaction_read_only', 'on', false) AS ro, "
        "set_config('statement_timeout', '1', false) AS t, pg_advisory_lock(42) AS l, "
        "set_config('role', 'pg_read_all_data', false) AS r FROM customers"
    )
    with SegmentServer(api_key="k") as segment:
        destination = segment_destination(config, segment)
        config.connect(config.audience("Poison", poison), destination)
        config.connect(config.audience("VIP", Customers.QUERY), destination)
        runner = Runner(engine, Sources(engine), Settings.from_env())
        try:
            [poisoned] = runner.run(Options(audiences=["Poison"]))
            # every pooled connection, taken at once: none kept a setting or a lock of the query
            with engine.connect() as a, engine.connect() as b, engine.connect() as c:
                for conn in (a, b, c):
                    settings = conn.exec_driver_sql(
                        "SELECT current_setting('default_transaction_read_only'), "
                        "current_setting('statement_timeout'), "
                        "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())), current_user"
                    ).one()
                    assert tuple(settings) == ("off", "0", 0, "postgres")
            [vip] = runner.run(Options(audiences=["VIP"]))
        finally:
            runner.close()
    assert (poisoned.outcome, vip.outcome) == ("ok", "ok"), (poisoned.error, vip.error)


def test_finding_3_a_run_failing_on_the_state_database_is_recorded_and_shown(
    state_url: str, backend: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    if backend == "sqlite":
        config.sql(
            "CREATE TRIGGER disk_full BEFORE INSERT ON sync_state "
            "BEGIN SELECT RAISE(ABORT, 'disk is full'); END"
        )
    else:
        config.sql(
            "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'disk is full'; END $$"
        )
        config.sql(
            "CREATE TRIGGER disk_full BEFORE INSERT ON sync_state FOR EACH ROW EXECUTE FUNCTION disk_full()"
        )
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        done = run_cli(state_url, "run")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [(outcome, error)] = config.sql("SELECT outcome, error FROM sync_runs")
    assert (
        outcome == "failed"
        and "the state database failed during the run" in error
        and "disk is full" in error
    )
    [row] = json.loads(run_cli(state_url, "status", "--json").stdout)
    assert "disk is full" in row["last_error"]


def test_finding_4_an_overlong_user_id_is_skipped_and_counted(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u" * 3000, "é" * 513)  # 3,000 bytes; 1,026 bytes in UTF-8
    customers.add("x" * 1024)  # exactly the limit: kept
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        [done] = sync_in_process(engine, segment)
        assert done.outcome == "ok", done.error
        assert sorted(m["userId"] for m in segment.messages) == ["u1", "x" * 1024]
    [(members, long)] = config.sql("SELECT members, long_user_ids FROM sync_runs")
    assert (members, long) == (2, 2)
    [row] = json.loads(run_cli(state_url, "status", "--json").stdout)
    assert row["last_run"]["long_user_ids"] == 2


def test_finding_5_an_audience_with_1000_trait_columns_syncs(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    columns = ", ".join(f"'v{i}' AS t{i:04d}" for i in range(1000))
    query = f"SELECT user_id, email, first_name, last_name, {columns} FROM customers"
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("Wide", query), segment_destination(config, segment))
        [done] = sync_in_process(engine, segment)
        assert done.outcome == "ok", done.error
        [message] = segment.messages
    traits = message["traits"]
    # the audience key, the names and email, the 1,000 columns, and the address Refersion's page requires
    assert len(traits) == 1 + 3 + 1000 + 1
    assert (traits["t0000"], traits["t0999"], traits["wide"]) == ("v0", "v999", True)


def test_finding_5_narrow_traits_are_stored_as_before(
    engine: sa.Engine, backend: str, config: Config, customers: Customers
) -> None:
    """Stored traits decide what is re-sent: up to 63 columns their text must not change."""
    customers.add("u1")
    query = "SELECT user_id, email, first_name, last_name, NULL AS phone, 3 AS n FROM customers"
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", query), segment_destination(config, segment))
        assert [r.outcome for r in sync_in_process(engine, segment)] == ["ok"]
    [(traits,)] = config.sql("SELECT traits FROM sync_state")
    expected = {
        "sqlite": '{"email":"u1@example.com","first_name":"Ada","last_name":"Lovelace","phone":null,"n":3}',
        "postgres": '{"n": 3, "email": "u1@example.com", "phone": null, "last_name": "Lovelace", '
        '"first_name": "Ada"}',
    }
    assert traits == expected[backend]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_finding_6_check_warns_while_the_source_role_can_write_large_objects(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    config.audience("VIP", Customers.QUERY)
    as_superuser = run_cli(state_url, "check")
    assert as_superuser.returncode == 0, as_superuser.stderr
    assert "warning: the source role 'postgres' is a superuser" in as_superuser.stdout

    role = "reader_" + sa.make_url(state_url).database.removeprefix("as_test_")  # type: ignore[union-attr]
    config.sql(f'CREATE ROLE "{role}" LOGIN')
    config.sql(f'GRANT SELECT ON customers TO "{role}"')
    source = sa.make_url(state_url).set(username=role).render_as_string(hide_password=False)
    try:
        reader = run_cli(state_url, "check", env={"SYNC_SOURCE_URL": source})
        assert reader.returncode == 0, reader.stdout + reader.stderr
        assert f"warning: the source role '{role}' may execute lo_from_bytea, lo_create" in reader.stdout
        functions = "lo_from_bytea(oid, bytea), lo_create(oid), lo_creat(integer), lo_import(text), "
        functions += "lo_put(oid, bigint, bytea), lowrite(integer, bytea)"
        config.sql(f"REVOKE EXECUTE ON FUNCTION {functions} FROM PUBLIC")
        revoked = run_cli(state_url, "check", env={"SYNC_SOURCE_URL": source})
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        assert "warning" not in revoked.stdout
    finally:
        config.sql(f'DROP OWNED BY "{role}"')
        config.sql(f'DROP ROLE "{role}"')


def test_finding_11_a_run_that_gives_up_says_exactly_how_many_changes_stay_pending(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add(*[f"u{i:03d}" for i in range(200)])
    with SegmentServer(api_key="k") as segment:
        config.connect(
            config.audience("VIP", Customers.QUERY), segment_destination(config, segment, max_in_flight=4)
        )
        segment.fault(503, times=10_000)
        [done] = sync_in_process(engine, segment, initial_only=True)
    assert done.outcome == "failed"
    assert "200 changes stay pending" in str(done.error)
    assert config.sql("SELECT pending FROM sync_runs") == [(200,)]
    [row] = json.loads(run_cli(state_url, "status", "--json").stdout)
    assert row["last_run"]["pending"] == 200


@pytest.mark.parametrize(
    ("backend", "query", "problem"),
    [
        (
            "sqlite",
            "SELECT user_id, (SELECT count(*) FROM pragma_table_info('customers')) AS n FROM customers",
            "not authorized",
        ),
        # Postgres's case, a column named twice, no longer fails since issue 21: its traits are written in
        # Python, in the run as in check
    ],
    indirect=["backend"],
)
def test_finding_13_check_runs_each_query_as_a_run_would(
    state_url: str, config: Config, customers: Customers, query: str, problem: str
) -> None:
    customers.add("u1")
    settings = {"transport": "segment", "endpoint": "http://127.0.0.1:9/never-reached"}
    config.connect(
        config.audience("Odd", query), config.destination("Segment", "refersion", settings, api_key="k")
    )
    run = run_cli(state_url, "run")
    checked = run_cli(state_url, "check")
    assert run.returncode == 1  # the run fails on it...
    assert checked.returncode == 2  # ...and so does check, naming it
    assert "audience 'Odd' (id 1): the query failed" in checked.stdout and problem in checked.stdout
    assert config.sql("SELECT count(*) FROM sync_runs WHERE outcome = 'ok'") == [(0,)]
