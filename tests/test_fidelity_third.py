"""The third fidelity pass (issue 22): each request and answer as the published references give it, end to end
on both backends against the sandbox's fakes, which refuse what the references refuse.

- segment-docs src/_data/catalog/destinations.yml: Everflow's settings are `apiKey` and `eventMapping` (a
  text-map), Refersion's `apiKey`; Everflow takes track only (no delete).
- segment-docs, Everflow destination: track properties adv1..adv5, `total`, `orderId` reach the postback.
- segment-docs, Refersion destination: an identify must contain email, a name and an `address` object.
- Refersion REST API v2 reference (OpenAPI): /affiliate/new's 90 countries and its answer's message with the
  numeric id; /affiliate/search's 422 "Could not find affiliates with this keyword."; status_change takes
  up to 50 integer ids.
- Everflow's advertiser postback docs: the base conversion carries no adv_event_id.
"""

import base64
import json
import logging

import httpx
import pytest
import sqlalchemy as sa

from sync.sandbox import RefersionServer, SegmentServer
from tests.conftest import Config, run_cli, sync_in_process
from tests.test_e2e import refersion_destination
from tests.test_fidelity import BUYERS, Buyers, ok, synced

ADDRESSED = "SELECT user_id, email, name, street, city, postal_code, country FROM people"


def people(engine: sa.Engine, *rows: dict[str, str | None]) -> None:
    """A source table of people with a name and address columns."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE people (user_id TEXT, email TEXT, name TEXT, street TEXT, city TEXT, "
            "postal_code TEXT, country TEXT)"
        )
        for row in rows:
            full = {"street": None, "city": None, "postal_code": None, "c": row.get("country"), **row}
            conn.execute(
                sa.text(
                    "INSERT INTO people VALUES (:user_id, :email, :name, :street, :city, :postal_code, :c)"
                ),
                full,
            )


def rejections(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT user_id, reason FROM sync_rejections")).all())  # type: ignore[arg-type]


def test_everflow_over_segment_sends_the_catalog_settings_and_its_events_arrive_mapped(
    config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    buyers.add("u0")
    buyers.add("u1", total="19.90", order_id="o-1")
    with SegmentServer(api_key="k", kind="everflow") as segment:
        settings = {
            "transport": "segment",
            "endpoint": segment.url,
            "event_mapping": {"Audience Entered": 7, "Audience Exited": 0},
            "params": {"amount": "total", "order_id": "order_id"},
            "rate_limit": 50,
        }
        audience = config.audience("Buyers", BUYERS)
        config.connect(audience, config.destination("Everflow", "everflow", settings, api_key="k"))
        synced(sync_in_process(engine, segment, initial_only=True))
        buyers.remove("u1")
        synced(sync_in_process(engine, segment))
        # the catalog's names only: the endpoint reads eventMapping, and maps every event
        assert {json.dumps(r.settings, sort_keys=True) for r in segment.requests} == {
            json.dumps({"apiKey": "k", "eventMapping": {"Audience Entered": "7", "Audience Exited": "0"}})
        }
        assert segment.dropped == []
        assert sorted(segment.postbacks, key=lambda p: (p["transaction_id"], str(p["adv_event_id"]))) == [
            {"transaction_id": "tid-u0", "adv_event_id": "7"},
            {"transaction_id": "tid-u1", "adv_event_id": "7", "total": 19.9, "orderId": "o-1"},
            {"transaction_id": "tid-u1", "adv_event_id": None, "total": 19.9, "orderId": "o-1"},  # base
        ]


def test_refersion_over_segment_sends_the_address_object_and_takes_a_name_only_row(
    config: Config, engine: sa.Engine
) -> None:
    people(
        engine,
        {
            "user_id": "u1",
            "email": "peter@example.com",
            "name": "Peter Gibbons",
            "street": "6th St",
            "city": "San Francisco",
            "postal_code": "94103",
            "country": "USA",
        },
        {"user_id": "u2", "email": "cher@example.com", "name": "Cher"},  # the page: "only the name" will do
    )
    with SegmentServer(api_key="k", kind="refersion") as segment:
        destination = config.destination(
            "Refersion", "refersion", {"transport": "segment", "endpoint": segment.url}, api_key="k"
        )
        config.connect(config.audience("People", ADDRESSED), destination)
        synced(sync_in_process(engine, segment, initial_only=True))
        traits = {m["userId"]: m["traits"] for m in segment.messages}
        assert traits["u1"] == {
            "people": True,
            "email": "peter@example.com",
            "name": "Peter Gibbons",
            "address": {
                "street": "6th St",
                "city": "San Francisco",
                "postal_code": "94103",
                "country": "USA",
            },
        }
        assert traits["u2"] == {"people": True, "email": "cher@example.com", "name": "Cher", "address": {}}
        assert {r.settings["apiKey"] for r in segment.requests} == {"k"}
        assert all(set(r.settings) == {"apiKey"} for r in segment.requests)


def test_refersion_native_splits_a_name_at_its_first_space_and_rejects_a_one_word_name(
    config: Config, engine: sa.Engine
) -> None:
    people(
        engine,
        {"user_id": "u1", "email": "ada@example.com", "name": "Ada King Lovelace"},
        {"user_id": "u2", "email": "cher@example.com", "name": "Cher"},
    )
    with RefersionServer() as refersion:
        config.connect(config.audience("People", ADDRESSED), refersion_destination(config, refersion))
        synced(sync_in_process(engine, refersion, initial_only=True))
        [created] = refersion.affiliates.values()
        assert (created["first_name"], created["last_name"]) == ("Ada", "King Lovelace")
        reason = rejections(engine)["u2"]
        assert reason.startswith("the name column holds one word ('Cher')")
        assert len(refersion.requests) == 1  # refused locally, never sent


def test_a_kenyan_customer_becomes_an_affiliate_without_the_country_and_the_run_counts_it(
    state_url: str, config: Config, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    buyers = Buyers(engine)
    buyers.add("u1", country="KE")  # Kenya: not one of Refersion's 90
    buyers.add("u2", country="Kenya")
    buyers.add("u3", country="GB")
    with RefersionServer() as refersion:
        config.connect(config.audience("Buyers", BUYERS), refersion_destination(config, refersion))
        with caplog.at_level(logging.WARNING):
            synced(sync_in_process(engine, refersion, initial_only=True))
        countries = {a["unique_merchant_id"]: a.get("country") for a in refersion.affiliates.values()}
        assert countries == {"u1": None, "u2": None, "u3": "GB"}
        assert rejections(engine) == {}
    [run] = json.loads(ok(run_cli(state_url, "runs", "--json")).stdout)
    assert (run["accepted"], run["countries_left_out"]) == (3, 2)
    [row] = json.loads(ok(run_cli(state_url, "status", "--json")).stdout)
    assert row["last_run"]["countries_left_out"] == 2
    [line] = [r for r in caplog.records if getattr(r, "action", None) == "countries_left_out"]
    assert "created 2 affiliate(s) without their country" in line.getMessage()


def test_a_search_that_finds_nothing_answers_422_and_means_no_match(
    state_url: str, config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    for user in ("u0", "u1", "u2"):
        buyers.add(user)
    with RefersionServer() as refersion:
        config.connect(
            config.audience("Buyers", BUYERS), refersion_destination(config, refersion, on_exit="disable")
        )
        # the members are already affiliates elsewhere (a move from Segment Engage): recorded, nothing sent
        synced(sync_in_process(engine, refersion, initial_only=True, baseline=True))
        assert refersion.requests == []
        # adoption finds nothing: "email taken", yet no affiliate has the email (another account's)
        buyers.add("u3")
        refersion.fault(
            422, json.dumps({"errors": ["The email you have entered is taken by another Affiliate."]})
        )
        # exits of users with no affiliate known: looked up by email, found nowhere: nothing to disable
        buyers.remove("u1")
        buyers.remove("u2")
        synced(sync_in_process(engine, refersion))
        searches = [r for r in refersion.requests if r.path.endswith("/search")]
        assert len(searches) == 3
        reasons = rejections(engine)
        assert reasons["u3"] == "no Refersion affiliate has exactly the email 'u3@example.com'"
        assert (
            reasons["u1"]
            == "no Refersion affiliate has exactly the email 'u1@example.com': nothing to disable"
        )
        with engine.connect() as conn:
            members = dict(conn.execute(sa.text("SELECT user_id, member FROM sync_state")).all())
        assert {u: bool(m) for u, m in members.items()} == {"u0": True, "u1": False, "u2": False}
        [entry] = json.loads(ok(run_cli(state_url, "explain", "u2", "--json")).stdout)
        assert entry["rejection"]["reason"].endswith(": nothing to disable")
        # forget finds no affiliate either: nothing to disable, and the user's rows go
        forgotten = ok(run_cli(state_url, "forget", "u0"))
        assert "Refersion: nothing to send (no Refersion affiliate has exactly the email" in forgotten.stdout
        assert "removed from the state tables" in forgotten.stderr
        # check --connect: the probe's search finds nothing, which proves the key
        connect = run_cli(state_url, "check", "--connect")
        assert connect.returncode == 0, connect.stdout + connect.stderr
        assert "credentials accepted" in connect.stdout + connect.stderr


def test_forty_exits_are_disabled_in_one_status_change_by_the_ids_kept_at_creation(
    config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    users = [f"u{i:02d}" for i in range(41)]
    for user in users:
        buyers.add(user)
    with RefersionServer() as refersion:
        config.connect(
            config.audience("Buyers", BUYERS), refersion_destination(config, refersion, on_exit="disable")
        )
        synced(sync_in_process(engine, refersion, initial_only=True))
        created = len(refersion.requests)
        for user in users[1:]:
            buyers.remove(user)
        synced(sync_in_process(engine, refersion, allow_mass_exit=True))
        [request] = refersion.requests[created:]
        assert request.path == "/v2/affiliate/status_change"
        assert len(request.json["ids"]) == 40 and all(type(i) is int for i in request.json["ids"])
        disabled = [a for a in refersion.affiliates.values() if a["status"] == "DISABLED"]
        assert len(disabled) == 40


def test_forget_sends_no_delete_to_everflow_over_segment_and_removes_the_rows(
    state_url: str, config: Config, engine: sa.Engine
) -> None:
    buyers = Buyers(engine)
    buyers.add("u1")
    with SegmentServer(api_key="k", kind="everflow") as segment:
        settings = {"transport": "segment", "endpoint": segment.url, "event_mapping": {"Audience Entered": 7}}
        config.connect(
            config.audience("Buyers", BUYERS),
            config.destination("Everflow", "everflow", settings, api_key="k"),
        )
        synced(sync_in_process(engine, segment, initial_only=True))
        sent = len(segment.requests)
        done = ok(run_cli(state_url, "forget", "u1"))
        assert "Everflow: nothing to send (Everflow keeps no profile to delete" in done.stdout
        assert len(segment.requests) == sent  # no delete: Everflow's Segment destination takes track only
    assert config.sql("SELECT count(*) FROM sync_state")[0][0] == 0


# The fakes refuse what the references refuse


def test_the_segment_fakes_refuse_settings_the_catalog_does_not_name_and_an_identify_without_address() -> (
    None
):
    def post(server: SegmentServer, body: dict[str, object], settings: dict[str, object]) -> httpx.Response:
        headers = {
            "Authorization": "Basic " + base64.b64encode(b"k:").decode(),
            "X-Segment-Settings": base64.b64encode(json.dumps(settings).encode()).decode(),
        }
        return httpx.post(server.url, json=body, headers=headers)

    track = {
        "type": "track",
        "event": "E",
        "messageId": "m",
        "context": {"referrer": {"type": "everflow", "id": "t"}},
    }
    with SegmentServer(api_key="k", kind="everflow") as everflow:
        wrong = post(everflow, track, {"apiKey": "k", "event_mapping": {"E": 7}})
        assert wrong.status_code == 400 and "eventMapping" in wrong.json()["message"]
        assert post(everflow, track, {"apiKey": "k", "eventMapping": {"E": "7"}}).status_code == 200
        assert everflow.postbacks == [{"transaction_id": "t", "adv_event_id": "7"}]
    identify = {"type": "identify", "messageId": "m", "traits": {"email": "a@example.com", "name": "A B"}}
    with SegmentServer(api_key="k", kind="refersion") as refersion:
        no_address = post(refersion, identify, {"apiKey": "k"})
        assert (no_address.status_code, no_address.json()) == (
            400,
            {"message": "traits must contain an address object"},
        )
        mixed = {
            **identify,
            "traits": {**identify["traits"], "address": {"postalCode": "1"}, "first_name": "A"},
        }
        assert post(refersion, mixed, {"apiKey": "k"}).status_code == 400
        assert (
            post(
                refersion, {**identify, "traits": {**identify["traits"], "address": {}}}, {"apiKey": "k"}
            ).status_code
            == 200
        )


def test_the_refersion_fake_refuses_a_country_outside_the_90() -> None:
    body = {
        "first_name": "A",
        "last_name": "B",
        "email": "a@example.com",
        "password": "Ab1!xyzqw",
        "status": "ACTIVE",
    }
    keys = {"Refersion-Public-Key": "pub", "Refersion-Secret-Key": "sec"}
    with RefersionServer() as refersion:
        for country in ("KE", "EG", "CY", "us", "USA"):
            r = httpx.post(
                refersion.url + "/v2/affiliate/new", json={**body, "country": country}, headers=keys
            )
            assert (r.status_code, r.json()) == (
                422,
                {"errors": [f"{country} is not a allowed value for field country"]},
            )
        r = httpx.post(refersion.url + "/v2/affiliate/new", json={**body, "country": "TZ"}, headers=keys)
        assert r.status_code == 200
        assert (
            r.json()["message"]
            == f"The affiliate {next(iter(refersion.affiliates))} has been created with the status of ACTIVE."
        )
