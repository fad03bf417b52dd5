"""The destinations as their published APIs describe them, end to end on both backends: the runner in process
against the sandbox's emulation, and the real command for check, explain and forget.

Each fact comes from a published reference, named beside the test that relies on it:
- Refersion REST API v2 reference (OpenAPI, affiliates): /affiliate/new answers the affiliate's code as `id`;
  /affiliate/get and /affiliate/status_change use the numeric id; /affiliate/search pages by email; `country`
  is a two-letter ISO code; 422 "email taken".
- Segment docs: the Everflow destination takes Track calls (context.referrer required); a partner answers 501
  to a call type it does not support ("Building a Direct Destination"); the Refersion destination's `delete`
  carries `email` at the top level.
- Everflow helpdesk (advertiser server postbacks): `aid`, `amount`, `order_id`, `adv1`..`adv5` parameters.
"""

import json
import subprocess
from typing import Any

import sqlalchemy as sa

from sync.runs import Result
from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from tests.conftest import Config, run_cli, sync_in_process
from tests.test_e2e import EVENTS, everflow_destination, refersion_destination

BUYERS = "SELECT user_id, email, first_name, last_name, country, transaction_id, total, order_id FROM buyers"


class Buyers:
    """A source table with the columns the destinations' optional fields come from."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE buyers (user_id TEXT, email TEXT, first_name TEXT, last_name TEXT, "
                "country TEXT, transaction_id TEXT, total TEXT, order_id TEXT)"
            )

    def add(self, user_id: str, **columns: Any) -> None:
        row = {
            "user_id": user_id,
            "email": f"{user_id}@example.com",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "transaction_id": f"tid-{user_id}",
            **columns,
        }
        names = ", ".join(row)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(f"INSERT INTO buyers ({names}) VALUES ({', '.join(':' + n for n in row)})"), row
            )

    def remove(self, user_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM buyers WHERE user_id = :u"), {"u": user_id})


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stderr
    return done


def synced(results: list[Result]) -> None:
    assert results and all(r.good for r in results), [(r.outcome, r.error) for r in results]


def test_refersion_create_then_exit_disables_the_numeric_id_then_reentry_reactivates(
    config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    buyers.add("u0")  # stays: the query never returns no rows (which the mass-exit guard would hold)
    buyers.add("u1")
    with RefersionServer() as refersion:
        audience = config.audience("Buyers", BUYERS)
        config.connect(audience, refersion_destination(config, refersion, on_exit="disable", status="ACTIVE"))
        synced(sync_in_process(engine, refersion, initial_only=True))
        affiliate = next(a for a in refersion.affiliates.values() if a["unique_merchant_id"] == "u1")
        buyers.remove("u1")
        synced(sync_in_process(engine, refersion))
        buyers.add("u1")
        synced(sync_in_process(engine, refersion))
        paths = [(r.path.removeprefix("/v2/affiliate/"), r.json) for r in refersion.requests[2:]]
        # the numeric id came with the create's answer: no lookup
        assert [p for p, _ in paths] == ["status_change", "status_change"]
        assert paths[0][1] == {"ids": [affiliate["id"]], "status": "DISABLED"}
        assert paths[1][1] == {"ids": [affiliate["id"]], "status": "ACTIVE"}
        assert affiliate["status"] == "ACTIVE"
        with engine.connect() as conn:
            state = conn.execute(
                sa.text("SELECT remote_id, remote_code, member FROM sync_state WHERE user_id = 'u1'")
            ).one()
        assert (state.remote_id, state.remote_code, bool(state.member)) == (
            str(affiliate["id"]),
            affiliate["code"],
            True,
        )


def test_refersion_email_taken_is_adopted_and_disabled_on_exit(config: Config, engine: sa.Engine) -> None:
    buyers = Buyers(engine)
    buyers.add("u1")
    buyers.add("u2")
    with RefersionServer() as refersion:
        existing = refersion.add_affiliate("u1@example.com")
        audience = config.audience("Buyers", BUYERS)
        config.connect(audience, refersion_destination(config, refersion, on_exit="disable"))
        synced(sync_in_process(engine, refersion, initial_only=True))
        assert len(refersion.affiliates) == 2  # u2 created, u1 adopted
        assert refersion.affiliates[existing]["status"] == "ACTIVE"  # adopted as it is
        buyers.remove("u1")
        synced(sync_in_process(engine, refersion))
        assert refersion.affiliates[existing]["status"] == "DISABLED"
        assert refersion.accepted[(existing, "DISABLED")] == 1
        adopting = [
            r.path.removeprefix("/v2/affiliate/")
            for r in refersion.requests
            if r.json.get("email") != "u2@example.com"
        ]
        assert adopting == ["new", "search", "get", "status_change"]


def test_refersion_country_names_become_codes_and_an_unmappable_one_is_rejected_once(
    config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    buyers.add("u1", country="United States")
    buyers.add("u2", country="Narnia")
    with RefersionServer() as refersion:
        audience = config.audience("Buyers", BUYERS)
        config.connect(audience, refersion_destination(config, refersion))
        synced(sync_in_process(engine, refersion, initial_only=True))
        # the rejected entry is not offered again until its traits change
        synced(sync_in_process(engine, refersion))
        [created] = refersion.affiliates.values()
        assert (created["unique_merchant_id"], created["country"]) == ("u1", "US")
        assert len(refersion.requests) == 1
        with engine.connect() as conn:
            [(user_id, reason)] = conn.execute(sa.text("SELECT user_id, reason FROM sync_rejections")).all()
        assert user_id == "u2"
        assert "country column holds 'Narnia'" in reason


def test_everflow_postbacks_carry_aid_and_mapped_params(config: Config, engine: sa.Engine) -> None:
    buyers = Buyers(engine)
    buyers.add("u1", total="19.90", order_id="o-1")
    buyers.add("u2")  # no total, no order: those parameters are left out
    with EverflowServer() as everflow:
        audience = config.audience("Buyers", BUYERS)
        params = {"amount": "total", "order_id": "order_id"}
        config.connect(audience, everflow_destination(config, everflow, aid="77", params=params))
        synced(sync_in_process(engine, everflow, initial_only=True))
        sent = {r.query["transaction_id"]: r.query for r in everflow.requests}
        assert sent["tid-u1"] == {
            "nid": "1",
            "transaction_id": "tid-u1",
            "adv_event_id": "7",
            "aid": "77",
            "amount": "19.90",
            "order_id": "o-1",
        }
        assert sent["tid-u2"] == {"nid": "1", "transaction_id": "tid-u2", "adv_event_id": "7", "aid": "77"}
        assert sum(everflow.conversions.values()) == 2


def test_everflow_over_the_segment_transport_sends_track_only(
    state_url: str, config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    buyers.add("u1")
    buyers.add("u2")
    with SegmentServer(api_key="k", kind="everflow") as segment:
        settings = {"transport": "segment", "endpoint": segment.url + "/everflow", "event_mapping": EVENTS}
        destination = config.destination("Everflow", "everflow", settings, api_key="k")
        audience = config.audience("Buyers", BUYERS)
        config.connect(audience, destination, {"type": "identify", "entered_event": "Joined"})
        synced(sync_in_process(engine, segment, initial_only=True))
        buyers.remove("u2")
        synced(sync_in_process(engine, segment))
        assert [(m["type"], m["event"], m["userId"]) for m in segment.messages] == [
            ("track", "Joined", "u1"),
            ("track", "Joined", "u2"),
            ("track", "Audience Exited", "u2"),
        ]
        assert segment.messages[-1]["properties"] == {"audience_key": "buyers", "buyers": False}
        assert segment.messages[-1]["context"]["referrer"] == {"type": "everflow", "id": "tid-u2"}
        check = ok(run_cli(state_url, "check"))
        assert "warning: audience_destinations row ('Buyers', 'Everflow'): settings.type is 'identify'" in (
            check.stdout
        )


def test_forget_disables_the_refersion_affiliate_by_numeric_id_and_sends_email_over_segment(
    state_url: str, config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    buyers.add("u1")
    with RefersionServer() as refersion, SegmentServer(api_key="k", kind="refersion") as segment:
        audience = config.audience("Buyers", BUYERS)
        config.connect(audience, refersion_destination(config, refersion))
        over_segment = config.destination(
            "Refersion via Segment",
            "refersion",
            {"transport": "segment", "endpoint": segment.url},
            api_key="k",
        )
        config.connect(audience, over_segment, {"type": "track"})
        synced(sync_in_process(engine, refersion, segment, initial_only=True))
        assert [m["type"] for m in segment.messages] == ["identify"]  # `track` is not what it takes
        check = ok(run_cli(state_url, "check")).stdout
        assert "('Buyers', 'Refersion via Segment'): settings.type is 'track'" in check
        [affiliate] = refersion.affiliates.values()
        done = ok(run_cli(state_url, "forget", "u1"))
        assert "Refersion: sent (affiliate disabled accepted)" in done.stdout
        assert affiliate["status"] == "DISABLED"
        assert refersion.requests[-1].json == {"ids": [affiliate["id"]], "status": "DISABLED"}
        delete = segment.messages[-1]
        assert (delete["type"], delete["email"]) == ("delete", "u1@example.com")


def test_check_warns_about_an_offer_name_and_still_exits_0(state_url: str, config: Config) -> None:
    config.destination(
        "Refersion",
        "refersion",
        {"api_base": "https://api.refersion.com/v2", "offer": "summer"},
        api_key="p.s",
    )
    done = run_cli(state_url, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("warning: destinations row id=1 ('Refersion'): settings.offer is 'summer'")
    assert "warning(s); every audience query runs" in done.stderr  # on Postgres, also the superuser's


def test_explain_says_received_for_everflow_postbacks(
    state_url: str, config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    buyers.add("u1")
    with EverflowServer() as everflow:
        audience = config.audience("Buyers", BUYERS)
        config.connect(audience, everflow_destination(config, everflow))
        synced(sync_in_process(engine, everflow, initial_only=True))
        [entry] = json.loads(ok(run_cli(state_url, "explain", "u1", "--json")).stdout)
        assert (entry["accepted"], entry["accepted_means"]) == (True, "received")
        table = ok(run_cli(state_url, "explain", "u1", env={"COLUMNS": "200"})).stdout
        assert "received by the postback endpoint" in table
