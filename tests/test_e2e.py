"""End to end: the real `audience-sync` command against loopback servers that behave like the destinations,
and the runner in process against the same emulation where the command adds nothing."""

import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync import database
from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from tests.conftest import SLOW_QUERY, Config, Customers, run_cli, sync_in_process

EVENTS = {"Audience Entered": 7, "Audience Exited": 8}


def everflow_destination(config: Config, server: EverflowServer, **settings: object) -> int:
    return config.destination(
        "Everflow",
        "everflow",
        {
            "tracking_domain": server.url,
            "network_id": "1",
            "event_mapping": EVENTS,
            "backoff_initial": 0.01,
            "backoff_max": 0.05,
            **settings,
        },
    )


def refersion_destination(config: Config, server: RefersionServer, **settings: object) -> int:
    return config.destination(
        "Refersion",
        "refersion",
        {"api_base": server.url + "/v2", "backoff_initial": 0.01, "backoff_max": 0.05, **settings},
        api_key="pub.sec",
    )


def test_initial_then_unchanged_then_churn(state_url: str, config: Config, customers: Customers) -> None:
    customers.add("u1", "u2", "u3")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        audience = config.audience("VIP Customers", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        config.connect(audience, refersion_destination(config, refersion, on_exit="disable"))

        first = run_cli(state_url, "initial")
        assert first.returncode == 0, first.stderr
        assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u2", "7"): 1, ("tid-u3", "7"): 1}
        assert sorted(k for (k,) in [(a["unique_merchant_id"],) for a in refersion.affiliates.values()]) == [
            "u1",
            "u2",
            "u3",
        ]

        second = run_cli(state_url, "run")
        assert second.returncode == 0, second.stderr
        assert len(everflow.requests) == 3 and len(refersion.requests) == 3

        customers.move("u2", segment="lapsed")
        customers.add("u4")
        third = run_cli(state_url, "run")
        assert third.returncode == 0, third.stderr
        assert everflow.accepted == {
            ("tid-u1", "7"): 1,
            ("tid-u2", "7"): 1,
            ("tid-u3", "7"): 1,
            ("tid-u4", "7"): 1,
            ("tid-u2", "8"): 1,
        }
        disabled = [a for a in refersion.affiliates.values() if a["status"] == "DISABLED"]
        assert [a["unique_merchant_id"] for a in disabled] == ["u2"]

        status = run_cli(state_url, "status", "--json")
        assert status.returncode == 0, status.stderr
        rows = {row["destination"]: row for row in json.loads(status.stdout)}
        assert rows["Everflow"]["members"] == 3 and rows["Everflow"]["accepted_members"] == 3
        assert rows["Refersion"]["last_run"]["outcome"] == "ok"


def test_destination_failing_mid_run_loses_nothing(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    users = [f"u{i:02d}" for i in range(30)]
    customers.add(*users)
    with EverflowServer(fail_ratio=0.5) as everflow:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow, max_attempts=1, max_in_flight=4))

        [first] = sync_in_process(engine, everflow)
        assert first.outcome == "failed"
        assert "will be sent again on the next run (last: gave up after 1 attempt: HTTP 503)" in (
            str(first.error)
        )
        partial = set(everflow.accepted)
        assert 0 < len(partial) < len(users)

        everflow.fail_ratio = 0
        [second] = sync_in_process(engine, everflow)
        assert second.outcome == "ok", second.error
        # every member accepted exactly once across both runs: nothing lost, nothing sent twice
        assert everflow.accepted == {(f"tid-{u}", "7"): 1 for u in users}


@pytest.mark.parametrize("breakage", ["a syntax error", "running past the timeout"])
def test_broken_query_fails_only_its_audience_and_sends_no_exits(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers, backend: str, breakage: str
) -> None:
    broken_query = {
        "a syntax error": "SELEC user_id FROM customers",
        "running past the timeout": SLOW_QUERY[backend],
    }[breakage]
    customers.add("u1", "u2")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        broken = config.audience("Broken Later", Customers.QUERY)
        healthy = config.audience("Healthy", Customers.QUERY.replace("'vip'", "'vip' OR segment = 'new'"))
        config.connect(broken, destination, {"entered_event": "Audience Entered"})
        config.connect(healthy, destination, {"entered_event": "Healthy Entered"})
        assert [r.outcome for r in sync_in_process(engine, everflow, initial_only=True)] == ["ok", "ok"]
        assert len(everflow.requests) == 2  # "Healthy Entered" is not mapped: skipped on purpose

        config.sql("UPDATE audiences SET query = :q WHERE id = :id", q=broken_query, id=broken)
        customers.add("u3", segment="new")
        config.sql(
            "UPDATE destinations SET settings = :s WHERE id = :id",
            id=destination,
            s=json.dumps(
                {
                    "tracking_domain": everflow.url,
                    "network_id": "1",
                    "event_mapping": {**EVENTS, "Healthy Entered": 9},
                }
            ),
        )
        results = {r.audience: r for r in sync_in_process(engine, everflow, query_timeout=1.0)}
        assert (results["Broken Later"].outcome, results["Healthy"].outcome) == ("failed", "ok")
        assert "Broken Later" in str(results["Broken Later"].error)
        assert "the query failed" in str(results["Broken Later"].error)
        # the healthy audience still synced its new member; the broken one sent nothing, no exits above all
        assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u2", "7"): 1, ("tid-u3", "9"): 1}

        status = json.loads(run_cli(state_url, "status", "--json").stdout)
        broken_row = next(row for row in status if row["audience"] == "Broken Later")
        assert broken_row["last_run"]["outcome"] == "failed"
        assert "the query failed" in broken_row["last_error"]
        assert broken_row["accepted_members"] == 2


def test_dry_run_prints_changes_and_changes_nothing(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        config.connect(audience, refersion_destination(config, refersion), {"type": "track"})

        preview = run_cli(state_url, "initial", "--dry-run")
        assert preview.returncode == 0, preview.stderr
        lines = [json.loads(line) for line in preview.stdout.splitlines()]
        assert sorted((line["destination"], line["message"]["userId"]) for line in lines) == [
            ("Everflow", "u1"),
            ("Everflow", "u2"),
            ("Refersion", "u1"),
            ("Refersion", "u2"),
        ]
        refersion_line = next(line for line in lines if line["destination"] == "Refersion")
        assert refersion_line["message"]["event"] == "Audience Entered"
        assert refersion_line["message"]["properties"] == {"audience_key": "vip", "vip": True}
        assert refersion_line["request"]["json"]["password"] == "***"
        everflow_line = next(line for line in lines if line["destination"] == "Everflow")
        assert everflow_line["message"]["traits"]["vip"] is True
        assert everflow_line["request"]["params"]["adv_event_id"] == "7"
        assert "[dry run]" in preview.stderr
        assert everflow.requests == [] and refersion.requests == []
        assert config.sql("SELECT key FROM audiences WHERE id = :id", id=audience) == [(None,)]  # not stored

        # nothing was recorded: the real initial sync still sends everything, with the previewed messageIds
        assert run_cli(state_url, "initial").returncode == 0
        assert len(everflow.accepted) == 2 and len(refersion.affiliates) == 2
        again = run_cli(state_url, "run", "--dry-run")
        assert again.returncode == 0 and again.stdout == ""

        customers.add("u3")  # a connection with history: its diff is written to a temporary table only
        dump = "SELECT * FROM sync_state ORDER BY destination_id, user_id"
        before = config.sql(dump), config.sql("SELECT * FROM sync_connections ORDER BY destination_id")
        third = run_cli(state_url, "run", "--dry-run")
        assert third.returncode == 0 and len(third.stdout.splitlines()) == 2  # u3 at both destinations
        assert (
            config.sql(dump),
            config.sql("SELECT * FROM sync_connections ORDER BY destination_id"),
        ) == before


def test_mass_exit_is_held_until_allowed(engine: sa.Engine, config: Config, customers: Customers) -> None:
    users = [f"u{i:03d}" for i in range(150)]
    customers.add(*users)
    with EverflowServer() as everflow:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow, rate_limit=1000))
        assert [r.outcome for r in sync_in_process(engine, everflow, initial_only=True)] == ["ok"]
        customers.move(*users[:120], segment="lapsed")

        [held] = sync_in_process(engine, everflow)
        assert held.outcome == "held"
        assert "held: it would send false to 120 of 150 accepted members" in str(held.error)
        assert len(everflow.requests) == 150

        [released] = sync_in_process(engine, everflow, allow_mass_exit=True)
        assert released.outcome == "ok", released.error
        assert sum(1 for tid, event in everflow.accepted if event == "8") == 120


def test_invalid_rows_are_named_and_do_not_stop_others(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        good = everflow_destination(config, everflow)
        missing_key = config.destination("Refersion", "refersion", {}, api_key_env="NOT_SET_ANYWHERE")
        bad_key = config.audience("!!!", Customers.QUERY)
        ok = config.audience("VIP", Customers.QUERY)
        config.connect(bad_key, good)
        config.connect(ok, good)
        config.connect(ok, missing_key)
        results = sync_in_process(engine, everflow)
        assert sorted(r.outcome for r in results) == ["invalid", "invalid", "ok"]
        errors = "\n".join(str(r.error) for r in results)
        assert (
            "audiences row id=1 ('!!!'): key '' (from name) is not snake_case; set audiences.key by hand"
            in errors
        )
        assert "api_key_env names 'NOT_SET_ANYWHERE', which is not set or empty" in errors
        assert everflow.accepted == {("tid-u1", "7"): 1}


def test_unmigrated_or_garbage_database_and_bad_settings_exit_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    unmigrated = run_cli(url, "run")
    assert unmigrated.returncode == 2
    assert (
        f"no state database at {tmp_path / 'fresh.db'}: run `audience-sync db upgrade`" in unmigrated.stderr
    )
    (tmp_path / "fresh.db").touch()
    unmigrated = run_cli(url, "run")
    assert unmigrated.returncode == 2
    assert "is not migrated: run `audience-sync db upgrade`" in unmigrated.stderr
    assert str(tmp_path / "fresh.db") in unmigrated.stderr
    bad_interval = run_cli(url, "run", env={"SYNC_INTERVAL": "often"})
    assert bad_interval.returncode == 2
    assert "SYNC_INTERVAL: 'often' is not a duration" in bad_interval.stderr
    (tmp_path / "garbage.db").write_bytes(bytes(range(256)) * 20)
    garbage = f"sqlite:///{tmp_path / 'garbage.db'}"
    for command in (("run",), ("status",), ("db", "upgrade")):
        not_a_database = run_cli(garbage, *command)
        assert not_a_database.returncode == 2, command
        assert "cannot reach the state database (sqlite file" in not_a_database.stderr, command
        assert "file is not a database" in not_a_database.stderr, command
        assert "Traceback" not in not_a_database.stderr, command
    assert "Traceback" not in bad_interval.stderr + unmigrated.stderr


def test_source_in_another_database(engine: sa.Engine, config: Config, tmp_path: Path) -> None:
    source_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    source = sa.create_engine(source_url)
    Customers(source).add("w1", "w2")
    with EverflowServer() as everflow:
        # colons and percent signs in the query are SQL, not parameters
        query = Customers.QUERY + " AND email LIKE '%@example.com' AND '10:30' = '10:30'"
        config.connect(config.audience("Warehouse VIPs", query), everflow_destination(config, everflow))
        [result] = sync_in_process(engine, everflow, source=database.create_engine(source_url, source=True))
        assert result.outcome == "ok", result.error
        assert everflow.accepted == {("tid-w1", "7"): 1, ("tid-w2", "7"): 1}


def test_resend_sends_every_member_again(engine: sa.Engine, config: Config, customers: Customers) -> None:
    customers.add("u1", "u2")
    with SegmentServer(api_key="seg-key") as segment:
        destination = config.destination(
            "Everflow via Segment",
            "everflow",
            {"transport": "segment", "endpoint": segment.url + "/v1/batch", "network_id": "9"},
            api_key="seg-key",
        )
        config.connect(config.audience("VIP", Customers.QUERY), destination)

        def initial(**options: object) -> list[str]:
            return [r.outcome for r in sync_in_process(engine, segment, initial_only=True, **options)]

        assert initial() == ["ok"]
        first_ids = sorted(message["messageId"] for message in segment.messages)
        assert len(first_ids) == 2
        # Segment's catalog names only: the row's network_id is no setting of Everflow's Segment destination
        assert segment.requests[0].settings == {"apiKey": "seg-key", "eventMapping": {}}

        assert initial() == []  # completed: nothing to do
        assert len(segment.messages) == 2
        preview = io.StringIO()
        assert initial(resend=True, dry_run=True, out=preview) == ["ok"]  # writes nothing to preview
        lines = preview.getvalue().splitlines()
        assert len(lines) == 2
        previewed_ids = {json.loads(line)["message"]["messageId"] for line in lines}
        assert initial() == []  # the preview forgot nothing: no resend
        assert len(segment.messages) == 2
        assert initial(resend=True) == ["ok"]
        assert len(segment.messages) == 4
        # a resend is a new delivery: new messageIds, so a receiver de-duplicating by id does not drop it
        resent_ids = {message["messageId"] for message in segment.messages[2:]}
        assert len(resent_ids) == 2 and not resent_ids & set(first_ids)
        assert resent_ids == previewed_ids


def test_key_change_after_sync_is_refused(engine: sa.Engine, config: Config, customers: Customers) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        audience = config.audience("Order Completed Last 30 Days", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        assert [r.outcome for r in sync_in_process(engine, everflow)] == ["ok"]
        stored = config.sql("SELECT key FROM audiences WHERE id = :id", id=audience)[0][0]
        assert stored == "order_completed_last_30_days"

        config.sql("UPDATE audiences SET name = 'Renamed' WHERE id = :id", id=audience)
        customers.add("u2")
        # a rename keeps the stored key
        assert [r.outcome for r in sync_in_process(engine, everflow)] == ["ok"]
        config.sql("UPDATE audiences SET key = 'something_else' WHERE id = :id", id=audience)
        customers.add("u3")
        [refused] = sync_in_process(engine, everflow)
        assert refused.outcome == "invalid"
        assert (
            "key changed from 'order_completed_last_30_days' to 'something_else' after syncing to 'Everflow'"
            in str(refused.error)
        )
        assert set(everflow.accepted) == {("tid-u1", "7"), ("tid-u2", "7")}


def test_refersion_answers_through_the_cli(state_url: str, config: Config, customers: Customers) -> None:
    customers.add("u1", "u2", "u3", "u4", "u5", "u6")
    config.sql("ALTER TABLE customers ADD COLUMN country TEXT")
    config.sql("UPDATE customers SET country = CASE WHEN user_id = 'u2' THEN 'Atlantis' ELSE 'Germany' END")
    with RefersionServer(rate_limit=2) as refersion:
        refersion.add_affiliate("u1@example.com")  # already an affiliate: 422 email taken, then adopted
        refersion.fault(503, times=1)
        destination = refersion_destination(config, refersion, rate_limit=50)  # faster than the server allows
        query = Customers.QUERY.replace("transaction_id", "transaction_id, country")
        config.connect(config.audience("VIP", query), destination)

        result = run_cli(state_url, "initial", env={"REFERSION_API_KEY": "pub.sec"})
        assert result.returncode == 0, result.stderr
        assert refersion.throttled > 0  # 429s with Retry-After were honoured and retried
        merchant_ids = sorted(str(a.get("unique_merchant_id")) for a in refersion.affiliates.values())
        assert merchant_ids == ["None", "u3", "u4", "u5", "u6"]  # u1 pre-existed; u2 refused locally
        assert {a["country"] for a in refersion.affiliates.values() if "country" in a} == {"DE"}
        [(user_id, reason)] = config.sql("SELECT user_id, reason FROM sync_rejections")
        assert (user_id, reason.split(",")[0]) == ("u2", "the country column holds 'Atlantis'")
        again = run_cli(state_url, "run")
        assert (
            again.returncode == 0 and "entered=0" in again.stderr
        )  # u2 is not retried until its traits change

        config.sql("UPDATE destinations SET api_key = 'pub.wrong-secret'")
        customers.add("u7")
        refused = run_cli(state_url, "run")
        assert refused.returncode == 1
        assert "credentials refused (HTTP 401: Invalid API credentials (error 2).)" in refused.stderr
        assert "wrong-secret" not in refused.stderr + refused.stdout


def test_audiences_with_many_destinations_at_once_deliver_every_change_once(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    # 4 audiences run at once; each one's 5 destinations read their diffs through the one connection that
    # holds its members, taking turns, and write with their own: 24 database connections in use together.
    customers.add(*[f"u{i}" for i in range(6)])
    with SegmentServer(api_key="k", delay=0.2) as segment:
        settings = {"transport": "segment", "endpoint": segment.url, "max_in_flight": 1, "rate_limit": 1000}
        destinations = [
            config.destination(f"Segment {d}", "everflow", settings, api_key="k") for d in range(5)
        ]
        for a in range(4):
            audience = config.audience(f"Audience {a}", Customers.QUERY)
            for destination in destinations:
                config.connect(audience, destination)

        done = sync_in_process(engine, segment)

        assert [r.outcome for r in done] == ["ok"] * 20, [r.error for r in done]
        message_ids = [m["messageId"] for m in segment.messages]
        assert len(message_ids) == len(set(message_ids)) == 4 * 5 * 6
