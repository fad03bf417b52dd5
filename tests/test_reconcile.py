"""`audience-sync reconcile`: the destinations' own records against the state, on both backends; the repair
queued for the next run; what explain, status, runs and the JSON show."""

import json
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from sync import sandbox, views
from sync.explain import explain_user
from sync.reconcile import Found, Options, Reconciler, store
from sync.sandbox import EverflowServer, RefersionServer
from sync.settings import Cadence, Settings
from sync.sources import Sources
from sync.tables import sync_state
from tests.conftest import Config, Customers, free_port, run_cli, start_cli, sync_in_process, wait_for

KEY = "pub.sec"


def reconcile_in_process(
    engine: sa.Engine, *servers: sandbox.FakeServer, reconcile_grace: float = 3600.0, **options: Any
) -> list[Found]:
    settings = Settings(
        str(engine.url), None, Cadence(7200, 10800), 60.0, 600.0, reconcile_grace=reconcile_grace
    )
    reconciler = Reconciler(engine, settings, transport=sandbox.transport(*servers))
    try:
        return reconciler.run(Options(**options))
    finally:
        reconciler.close()


def refersion_connection(config: Config, server: RefersionServer, query: str, **settings: Any) -> None:
    destination = config.destination(
        "Refersion",
        "refersion",
        {"api_base": f"{server.url}/v2", "on_exit": "disable", "status": "ACTIVE", **settings},
        api_key=KEY,
    )
    config.connect(config.audience("VIP", query), destination)


def synced(engine: sa.Engine, config: Config, customers: Customers, refersion: RefersionServer) -> None:
    """Members a to e, synced to Refersion (status ACTIVE, on_exit disable)."""
    customers.add("a", "b", "c", "d", "e")
    refersion_connection(config, refersion, Customers.QUERY)
    sync_in_process(engine, refersion)


def state(engine: sa.Engine, user_id: str) -> sa.Row[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM sync_state WHERE user_id = :u"), {"u": user_id}).one()


def codes(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT user_id, remote_code FROM sync_state")).all())


def drift_each_way(engine: sa.Engine, refersion: RefersionServer) -> None:
    """a disabled by hand, b deleted, e (who left, disabled) re-activated by hand, and one stranger."""
    known = codes(engine)
    refersion.change_by_hand(known["a"], "DISABLED")
    refersion.change_by_hand(known["b"])
    refersion.change_by_hand(known["e"], "ACTIVE")
    refersion.add_affiliate("stranger@example.com", first_name="Not", last_name="Ours")


def test_refersion_drift_is_reported_repaired_by_the_next_run_and_a_second_reconcile_is_clean(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    with RefersionServer() as refersion:
        synced(engine, config, customers, refersion)
        customers.move("e", segment="gone")
        sync_in_process(engine, refersion)
        drift_each_way(engine, refersion)
        before = len(refersion.requests)

        [found] = reconcile_in_process(engine, refersion)

        assert {r.path for r in refersion.requests[before:]} == {"/v2/affiliate/list"}  # reads only
        assert found.counts == {
            "confirmed": 2,
            "drifted": 2,
            "missing": 1,
            "rejected": 0,
            "not_found": 0,
            "not_ours": 1,
        }
        by_user = {u["user_id"]: u for u in found.users}
        assert {u: by_user[u]["outcome"] for u in by_user} == {"a": "drifted", "b": "missing", "e": "drifted"}
        assert by_user["a"]["reason"].startswith("disabled by hand in Refersion")
        assert state(engine, "a").reconciled == "drifted"
        assert state(engine, "c").reconciled == "confirmed"
        assert state(engine, "a").in_doubt_since is None  # nothing queued without --repair

        [repaired] = reconcile_in_process(engine, refersion, repair=True, allow_mass_repair=True)
        assert repaired.repairs == 3
        sync_in_process(engine, refersion)

        assert refersion.by_code(codes(engine)["a"])["status"] == "ACTIVE"  # type: ignore[index]
        assert refersion.by_code(codes(engine)["e"])["status"] == "DISABLED"  # type: ignore[index]
        assert refersion.by_code(codes(engine)["b"])["status"] == "ACTIVE"  # type: ignore[index]  # again
        [clean] = reconcile_in_process(engine, refersion)
        assert clean.counts == {
            "confirmed": 5,
            "drifted": 0,
            "missing": 0,
            "rejected": 0,
            "not_found": 0,
            "not_ours": 1,
        }
        assert clean.users == []


def test_a_repair_over_the_share_of_a_connection_is_held(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    with RefersionServer() as refersion:
        synced(engine, config, customers, refersion)
        refersion.change_by_hand(codes(engine)["a"], "DISABLED")

        [found] = reconcile_in_process(engine, refersion, repair=True)  # 1 of 5: more than 10%

        assert found.outcome == "held"
        assert "--allow-mass-repair" in (found.held or "")
        assert state(engine, "a").in_doubt_since is None


def test_a_member_disabled_by_hand_is_not_repaired_where_a_run_would_leave_it_disabled(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    with RefersionServer() as refersion:
        customers.add("a", "b")
        refersion_connection(config, refersion, Customers.QUERY, status="PENDING", on_reentry="ignore")
        sync_in_process(engine, refersion)
        refersion.change_by_hand(codes(engine)["a"], "DISABLED")

        [found] = reconcile_in_process(engine, refersion, repair=True, allow_mass_repair=True)

        assert (found.counts["drifted"], found.repairs) == (1, 0)
        assert "not repaired: with status PENDING and on_reentry ignore" in found.users[0]["reason"]
        assert state(engine, "a").in_doubt_since is None


def test_a_refused_key_cannot_verify(engine: sa.Engine, config: Config, customers: Customers) -> None:
    with RefersionServer(secret_key="other") as refersion:
        customers.add("a")
        refersion_connection(config, refersion, Customers.QUERY)

        [found] = reconcile_in_process(engine, refersion)

        assert not found.verifiable
        assert "credentials refused" in (found.reason or "")
        assert "sec" not in (found.reason or "").replace("secret", "")


# Everflow: the conversion report, read by sync.destinations.everflow_reports from the sandbox's Network API.


def everflow_connection(config: Config, everflow: EverflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVERFLOW_REPORTING_KEY", everflow.reports.api_key)
    destination = config.destination(
        "Everflow",
        "everflow",
        {
            "tracking_domain": everflow.url,
            "network_id": "1",
            "event_mapping": {"Audience Entered": 5},
            "reporting_api_key_env": "EVERFLOW_REPORTING_KEY",
            "reporting_api_base": everflow.url + "/v1",
        },
    )
    config.connect(config.audience("VIP", Customers.QUERY), destination)


def explained(engine: sa.Engine, user_id: str) -> str:
    """What `explain USER` shows of the user's last reconcile."""
    with engine.connect() as conn:
        [entry] = explain_user(conn, Sources(engine), user_id, 60.0)
    return views._reconciled(entry)


class ShiftingRefersion(RefersionServer):
    """The merchant deletes an affiliate of page 1 between the reading of page 1 and page 2: the rest shift
    back by one, and the first of page 2 is never listed."""

    victim: str | None = None

    def _list(self, data: dict[str, Any]) -> Any:
        if str(data.get("page")) == "2" and self.victim is not None:
            code, self.victim = self.victim, None
            del self.affiliates[self._by_code(code)["id"]]
            self._listed = None
        return super()._list(data)


def test_an_affiliate_shifted_out_of_the_pages_read_is_not_missing_and_not_re_created(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    with ShiftingRefersion() as refersion:
        refersion.add_affiliate("stranger@example.com", first_name="Not", last_name="Ours")
        customers.add(*(f"u{n:03}" for n in range(110)))
        refersion_connection(config, refersion, Customers.QUERY)
        sync_in_process(engine, refersion)
        refersion.victim = refersion.code_of(min(refersion.affiliates))  # the stranger, on page 1
        affiliates = len(refersion.affiliates)

        [found] = reconcile_in_process(engine, refersion, repair=True)
        sync_in_process(engine, refersion)

    assert found.counts["missing"] == 0 and found.repairs == 0, found.users
    [unsure] = [u for u in found.users if u["outcome"] == "unverified"]
    assert "the list changed while it was read" in unsure["reason"]
    assert len(refersion.affiliates) == affiliates - 1  # the stranger only: nothing created


def test_everflow_a_duplicate_is_reported_never_resent_and_a_dropped_conversion_is_sent_again(
    engine: sa.Engine, config: Config, customers: Customers, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EverflowServer(events={"5": "Audience Entered"}) as everflow:  # the event's name in Everflow
        everflow_connection(config, everflow, monkeypatch)
        customers.add(*(f"u{i}" for i in range(20)))
        sync_in_process(engine, everflow)
        customers.move("u1", segment="gone")  # u1 leaves (Exited is not mapped) and comes back: a duplicate
        sync_in_process(engine, everflow)
        customers.move("u1", segment="vip")
        sync_in_process(engine, everflow)
        [first, duplicate] = [c for c in everflow.reports.conversions if c.transaction_id == "tid-u1"]
        assert duplicate.error_code == 8
        first.at -= 3 * 3600  # u1 first entered hours before the re-entry, as in life
        # Everflow never recorded u2's conversion: gone from the report, and not there to be duplicated
        assert everflow.drop_conversions("tid-u2") == 1
        del everflow.conversions[("tid-u2", "5")]
        before = len(everflow.requests)

        [found] = reconcile_in_process(engine, everflow, repair=True, reconcile_grace=0.0)

        assert {r.path for r in everflow.requests[before:]} <= {
            "/v1/networks/reporting/conversions",
            "/v1/networks/reporting/events/tid-u2",
        }  # reads only
        assert (found.counts["confirmed"], found.counts["rejected"], found.counts["not_found"]) == (18, 1, 1)
        by_user = {u["user_id"]: u for u in found.users}
        assert by_user["u1"]["outcome"] == "rejected" and "8" in by_user["u1"]["reason"]
        assert found.repairs == 1  # u2 only: a rejected conversion is never sent again
        assert explained(engine, "u1").startswith("Everflow rejected it: ")
        assert explained(engine, "u3").startswith("confirmed by Everflow's report at ")
        sync_in_process(engine, everflow)

        assert everflow.accepted[("tid-u2", "5")] == 2  # sent again
        assert everflow.accepted[("tid-u1", "5")] == 2  # the entry and the re-entry: not a third time
        [again] = reconcile_in_process(engine, everflow, reconcile_grace=0.0)
        assert (again.counts["confirmed"], again.counts["rejected"], again.counts["not_found"]) == (19, 1, 0)


def test_everflow_sends_are_read_in_the_order_they_were_accepted_one_report_per_run_of_sends(
    engine: sa.Engine, config: Config, customers: Customers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Users accepted by two runs hours apart, their ids interleaved: read by user id, each one would start
    a window of its own (a report request each, against the network's shared quota); read by time, two
    reports, across state pages whose keyset falls between users accepted at the same moment."""
    monkeypatch.setattr(store, "PAGE", 5)
    with EverflowServer(events={"5": "Audience Entered"}) as everflow:
        everflow_connection(config, everflow, monkeypatch)
        customers.add(*(f"u{i:02}" for i in range(12)))
        sync_in_process(engine, everflow)
        runs = [datetime.now(UTC) - timedelta(hours=8), datetime.now(UTC) - timedelta(hours=2)]
        accepted = {f"u{i:02}": runs[i % 2] + timedelta(seconds=i // 4) for i in range(12)}
        with engine.begin() as conn:
            for user_id, at in accepted.items():
                conn.execute(
                    sa.update(sync_state).where(sync_state.c.user_id == user_id), {"accepted_at": at}
                )
        for conversion in everflow.reports.conversions:
            conversion.at = accepted[conversion.transaction_id.removeprefix("tid-")].timestamp()
        before = len(everflow.requests)

        [found] = reconcile_in_process(engine, everflow)

        assert found.counts["confirmed"] == 12, found.users
        asked = [r.path for r in everflow.requests[before:] if r.path.startswith("/v1/")]
        assert asked == ["/v1/networks/reporting/conversions"] * 2, asked


def test_everflow_without_a_reporting_key_or_with_a_wrong_one_cannot_verify(
    engine: sa.Engine, config: Config, customers: Customers, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EverflowServer(events={"5": "Audience Entered"}) as everflow:  # the event's name in Everflow
        everflow_connection(config, everflow, monkeypatch)
        customers.add("u1")
        sync_in_process(engine, everflow)
        monkeypatch.setenv("EVERFLOW_REPORTING_KEY", "wrong")

        [refused] = reconcile_in_process(engine, everflow)
        monkeypatch.delenv("EVERFLOW_REPORTING_KEY")
        [unset] = reconcile_in_process(engine, everflow)

        assert not refused.verifiable and "refused" in (refused.reason or "")
        assert "wrong" not in (refused.reason or "")
        assert not unset.verifiable and "EVERFLOW_REPORTING_KEY" in (unset.reason or "")


# The command, as an operator runs it.


def test_reconcile_command_json_explain_status_runs_and_exit_codes(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    with RefersionServer() as refersion, EverflowServer() as everflow:
        customers.add("a", "b", "c")
        refersion_connection(config, refersion, Customers.QUERY)
        segment = config.destination(
            "Segment", "refersion", {"transport": "segment", "endpoint": everflow.url}, api_key="k"
        )
        config.connect(config.audience("Others", Customers.QUERY), segment)
        sync_in_process(engine, refersion, audiences=["VIP"])
        refersion.change_by_hand(codes(engine)["a"], "DISABLED")

        done = run_cli(state_url, "reconcile", "--audience", "VIP", "--json")
        assert done.returncode == 0, done.stderr
        [one] = json.loads(done.stdout)["connections"]
        assert (one["audience"], one["destination"], one["verifiable"]) == ("VIP", "Refersion", True)
        assert one["counts"]["drifted"] == 1
        assert one["users"] == [
            {
                "user_id": "a",
                "outcome": "drifted",
                "reason": "disabled by hand in Refersion; repair: re-activate the affiliate",
            }
        ]

        explained = run_cli(state_url, "explain", "a")
        assert "disabled by hand in Refersion since reconcile at" in explained.stdout
        status = run_cli(state_url, "status", "--json")
        [vip] = [row for row in json.loads(status.stdout) if row["audience"] == "VIP"]
        assert vip["reconciled"] == {"confirmed": 2, "drifted": 1, "unverified": 0}
        assert "(reconciled: 2 confirmed, 1 drifted, 0 unverified)" in run_cli(state_url, "status").stdout
        runs = run_cli(state_url, "runs", "--json")
        assert [r["outcome"] for r in json.loads(runs.stdout) if r["kind"] == "reconcile"] == ["drifted"]
        assert "reconcile: drifted" in run_cli(state_url, "runs").stdout
        shown = run_cli(state_url, "reconcile", "--audience", "VIP")  # the table, and the user not confirmed
        assert "disabled by hand in Refersion" in shown.stdout and shown.returncode == 0

        segment_only = run_cli(state_url, "reconcile", "--destination", "Segment", "--json")
        assert segment_only.returncode == 1
        [unverifiable] = json.loads(segment_only.stdout)["connections"]
        assert unverifiable["verifiable"] is False
        assert "Segment transport has no read API" in unverifiable["reason"]

        unknown = run_cli(state_url, "reconcile", "--audience", "Nobody")
        assert unknown.returncode == 2 and "no audience named 'Nobody'" in unknown.stderr
        with engine.begin() as conn:  # an audience whose row is broken is said, not skipped
            conn.execute(sa.text("UPDATE audiences SET schedule = 'every so often' WHERE name = 'Others'"))
        broken = run_cli(state_url, "reconcile", "--audience", "Others", "--json")
        assert broken.returncode == 1, broken.stderr
        [invalid] = json.loads(broken.stdout)["connections"]
        assert (invalid["audience"], invalid["verifiable"]) == ("Others", False)
        assert "schedule" in invalid["reason"]
        usage = run_cli(state_url, "reconcile", "--allow-mass-repair")
        assert usage.returncode == 2
        assert "--allow-mass-repair goes with --repair" in usage.stderr


def test_baselined_users_are_matched_by_email(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    with RefersionServer() as refersion:
        customers.add("a", "b")
        for user in ("a", "b"):  # created by Segment's Refersion destination before the move
            refersion.add_affiliate(f"{user.upper()}@Example.com", first_name="Ada", last_name="Lovelace")
        refersion_connection(config, refersion, Customers.QUERY)
        sync_in_process(engine, refersion, initial_only=True, baseline=True)
        refersion.change_by_hand(refersion.code_of(min(refersion.affiliates)), "DENIED")

        before = len(refersion.requests)
        [found] = reconcile_in_process(engine, refersion, repair=True, allow_mass_repair=True)
        sync_in_process(engine, refersion)

        assert (found.counts["confirmed"], found.counts["drifted"], found.counts["not_ours"]) == (1, 1, 0)
        assert found.users[0]["user_id"] == "a"
        assert found.users[0]["reason"].startswith("denied by hand in Refersion")
        # known by email only: a run would create an affiliate (and adopt the one there), not re-activate it
        assert "not repaired: audience-sync knows this affiliate by email only" in found.users[0]["reason"]
        assert found.repairs == 0
        assert {r.path for r in refersion.requests[before:]} == {"/v2/affiliate/list"}


def test_a_baselined_user_whose_email_two_affiliates_share_is_not_judged(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    with RefersionServer() as refersion:
        customers.add("a")
        refersion.add_affiliate("a@example.com", first_name="Ada", last_name="Lovelace")
        refersion_connection(config, refersion, Customers.QUERY)
        sync_in_process(engine, refersion, initial_only=True, baseline=True)
        old = refersion.add_affiliate("A@Example.com", first_name="Ada", last_name="Lovelace")  # by hand
        refersion.change_by_hand(refersion.code_of(old), "DISABLED")

        [found] = reconcile_in_process(engine, refersion)

    assert (found.counts["confirmed"], found.counts["drifted"]) == (0, 0)
    assert found.users == [
        {"user_id": "a", "outcome": "unverified", "reason": "2 affiliates in Refersion have this email"}
    ]


def test_a_reconcile_that_lists_no_users_keeps_only_counts(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    """The daemon's: a drift of every user (a wrong account, a reset merchant) costs no memory per user."""
    with RefersionServer() as refersion:
        synced(engine, config, customers, refersion)
        for code in codes(engine).values():
            refersion.change_by_hand(code)

        [found] = reconcile_in_process(engine, refersion, list_users=False)

    assert (found.counts["missing"], found.users) == (5, [])
    assert state(engine, "a").reconciled == "missing"  # kept per user in the state all the same


def test_the_sandbox_lists_affiliates_as_published() -> None:
    with RefersionServer() as refersion, httpx.Client(base_url=f"{refersion.url}/v2") as client:
        for n in range(5):
            refersion.add_affiliate(f"p{n}@example.com", first_name="P", last_name=str(n))
        keys = {"Refersion-Public-Key": "pub", "Refersion-Secret-Key": "sec"}

        def listed(body: dict[str, Any], headers: dict[str, str] = keys) -> httpx.Response:
            return client.post("/affiliate/list", json=body, headers=headers)

        first, last = listed({"limit": "3", "page": "1"}).json(), listed({"limit": "3", "page": "2"}).json()
        assert first["total"] == last["total"] == 5
        assert [a["email"] for a in first["results"] + last["results"]] == [
            f"p{n}@example.com" for n in range(5)
        ]
        assert set(first["results"][0]) == {
            "id",
            "offer_id",
            "status",
            "first_name",
            "last_name",
            "email",
            "custom_fields",
        }
        assert len(listed({}).json()["results"]) == 3  # limit's default: "3"
        assert listed({"limit": "101"}).status_code == 204  # at most 100: an invalid field
        assert (
            listed({"limit": "3"}, {"Refersion-Public-Key": "pub", "Refersion-Secret-Key": "x"}).status_code
            == 401
        )
        assert listed({"limit": "3", "page": "9"}).json()["results"] == []


def test_the_daemon_reconciles_every_interval_and_shows_it_in_the_metrics(
    state_url: str, config: Config, customers: Customers
) -> None:
    with RefersionServer() as refersion:
        customers.add("a", "b")
        refersion_connection(config, refersion, Customers.QUERY)
        port = free_port()
        env = {
            "SYNC_INTERVAL": "1h",
            "SYNC_RECONCILE_INTERVAL": "2s",
            "SYNC_RELOAD_INTERVAL": "1s",
            "SYNC_METRICS_PORT": str(port),
        }
        daemon = start_cli(state_url, "daemon", env=env)
        try:
            wait_for(lambda: len(config.sql("SELECT id FROM sync_reconcile_runs")) >= 2, 30)
            refersion.change_by_hand(refersion.code_of(min(refersion.affiliates)), "DISABLED")
            labels = 'audience="vip",destination_id="1"'
            drifted = f'audience_sync_reconciled_users{{{labels},outcome="drifted"}} 1.0'
            wait_for(lambda: drifted in httpx.get(f"http://127.0.0.1:{port}/metrics").text, 30)
            exposed = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert f"audience_sync_reconcile_verifiable{{{labels}}} 1.0" in exposed
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, stderr
        # the daemon only reads: no status change went out for the affiliate disabled by hand
        assert {r.path for r in refersion.requests} == {"/v2/affiliate/new", "/v2/affiliate/list"}
        # restarted, a day from its next reconcile: the gauges show what the last one found (the drift alert
        # does not resolve for a day)
        listed = len(refersion.requests)
        daemon = start_cli(state_url, "daemon", env=env | {"SYNC_RECONCILE_INTERVAL": "24h"})
        try:
            wait_for(lambda: "audience_sync_build_info" in _metrics(port), 30)
            exposed = _metrics(port)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=30)
        assert drifted in exposed and f"audience_sync_reconcile_verifiable{{{labels}}} 1.0" in exposed
        assert len(refersion.requests) == listed  # from the history, not a new reconcile


def _metrics(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics").text
    except httpx.TransportError:
        return ""


def test_a_bad_reconcile_interval_is_one_line(state_url: str) -> None:
    done = run_cli(state_url, "daemon", env={"SYNC_RECONCILE_INTERVAL": "soon"}, timeout=30)
    assert done.returncode == 2
    assert "SYNC_RECONCILE_INTERVAL: 'soon' is not a duration" in done.stderr


def test_reconcile_settings_default_and_zero_turns_the_daemons_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SYNC_RECONCILE_INTERVAL", "SYNC_REPAIR_SHARE", "SYNC_RECONCILE_GRACE"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings.from_env()
    assert (defaults.reconcile_interval, defaults.repair_share, defaults.reconcile_grace) == (
        86400,
        0.1,
        3600,
    )
    monkeypatch.setenv("SYNC_RECONCILE_INTERVAL", "0")
    assert Settings.from_env().reconcile_interval is None
