"""Destinations and the delivery layer against the loopback fake servers, over real HTTP (no database).

Each test builds a destination the way the runner does (`load_destination` on a row and its settings text),
turns changes into Segment messages, lets the destination check and plan them, and sends the calls with a
`Delivery` over a `Sender`. Assertions look at what the server received and at the outcomes.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from sync.connections import Link
from sync.delivery import Delivery, Sender, Why
from sync.destinations import load_destination
from sync.destinations.base import Destination
from sync.destinations.http import Call
from sync.errors import ConfigError
from sync.messages import build_message
from sync.models import Change, Outcome, traits_json
from sync.ratelimit import RateLimiter
from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from sync.sinks import planned

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
CONNECTION = Link(audience_id=7, audience_key="vip_customers", destination_id=1, destination_name="Partner")
EVENTS = {"Audience Entered": 11, "Audience Exited": 0}  # id 0 is Everflow's base conversion
FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "max_attempts": 3, "timeout": 5, "rate_limit": 1000}
PASSWORD_RULES = [r"[A-Z]", r"[a-z]", r"[0-9]", r"[^A-Za-z0-9]"]

MakeDelivery = Callable[[Destination], Delivery]


# Helpers


def change(
    user_id: str,
    value: bool = True,
    *,
    remote_id: str | int | None = None,
    remote_active: bool = True,
    remote_code: str | None = None,
    **traits: Any,
) -> Change:
    known = None if remote_id is None else str(remote_id)
    return Change(user_id, value, traits_json(traits), 0, known, remote_active, remote_code)


def member(user_id: str, value: bool = True, **extra: Any) -> Change:
    """A complete member: email, names and a transaction id."""
    traits = {
        "email": f"{user_id}@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "transaction_id": f"tid-{user_id}",
        **extra,
    }
    return change(user_id, value, **traits)


def destination(
    kind: str, settings: dict[str, Any], api_key: str | None = None, api_key_env: str | None = None
) -> Destination:
    row = SimpleNamespace(id=1, name="Partner", kind=kind, api_key=api_key, api_key_env=api_key_env)
    return load_destination(row, json.dumps(settings))  # type: ignore[arg-type]


def everflow(server: EverflowServer, **settings: Any) -> Destination:
    base = {"tracking_domain": server.url, "network_id": server.network_id, "event_mapping": EVENTS}
    return destination("everflow", {**base, **FAST, **settings})


def refersion(server: RefersionServer, api_key: str = "pub.sec", **settings: Any) -> Destination:
    return destination("refersion", {"api_base": server.url + "/v2", **FAST, **settings}, api_key=api_key)


def segment(server: SegmentServer, kind: str = "everflow", **settings: Any) -> Destination:
    base = {"transport": "segment", "endpoint": server.url + "/ingest"}
    return destination(kind, {**base, **FAST, **settings}, api_key=server.api_key)


def prepare(
    dest: Destination, changes: list[Change], connection: Link = CONNECTION
) -> tuple[list[Outcome], list[Call], dict[str, dict[str, Any]]]:
    """What a run does before sending (`sinks.planned`): outcomes known without a request; requests."""
    messages, outcomes, calls = planned(connection, dest, changes, NOW)
    return outcomes, calls, messages


def by_user(outcomes: list[Outcome]) -> dict[str, Outcome]:
    found = {o.change.user_id: o for o in outcomes}
    assert len(found) == len(outcomes), "one outcome per change"
    return found


def send(
    dest: Destination, delivery: Delivery, changes: list[Change], connection: Link = CONNECTION
) -> dict[str, Outcome]:
    done, calls, _ = prepare(dest, changes, connection)
    return by_user(done + deliver(delivery, calls))


def deliver(delivery: Delivery, calls: list[Call]) -> list[Outcome]:
    """What a delivery of `calls` comes to, as from a destination that accepted requests before: these tests
    read answers one by one (refusals alike with nothing accepted are judged apart, `_judged` below)."""
    delivery.trusted = True
    return delivery.send_all(calls) + delivery.held()


def reasons(outcomes: list[Outcome] | dict[str, Outcome]) -> str:
    values = outcomes.values() if isinstance(outcomes, dict) else outcomes
    return " | ".join(o.reason or "" for o in values)


@pytest.fixture
def make_delivery() -> Iterator[MakeDelivery]:
    """A Delivery over a fresh Sender; every Sender is closed after the test."""
    senders: list[Sender] = []

    def make(dest: Destination) -> Delivery:
        sender = Sender(dest)
        senders.append(sender)
        return Delivery(sender)

    yield make
    for sender in senders:
        sender.close()


# Everflow


def test_everflow_postbacks(make_delivery: MakeDelivery) -> None:
    with EverflowServer(network_id="42", verification_token="tok-Q9z") as server:
        dest = everflow(server, network_id=42, verification_token="tok-Q9z")
        outcomes = send(dest, make_delivery(dest), [member("u1"), member("u2", False)])
        assert {u: o.status for u, o in outcomes.items()} == {"u1": "accepted", "u2": "accepted"}
        # the exit is mapped to 0, the base conversion: its postback carries no adv_event_id
        assert sorted((r.method, r.path, tuple(sorted(r.query.items()))) for r in server.requests) == [
            (
                "GET",
                "/",
                (
                    ("adv_event_id", "11"),
                    ("nid", "42"),
                    ("transaction_id", "tid-u1"),
                    ("verification_token", "tok-Q9z"),
                ),
            ),
            (
                "GET",
                "/",
                (
                    ("nid", "42"),
                    ("transaction_id", "tid-u2"),
                    ("verification_token", "tok-Q9z"),
                ),
            ),
        ]
        assert server.accepted == {("tid-u1", "11"): 1, ("tid-u2", ""): 1}


def test_everflow_without_token_sends_none_and_uses_connection_event_names(
    make_delivery: MakeDelivery,
) -> None:
    connection = Link(7, "vip_customers", 1, "Partner", entered_event="Joined VIP")
    with EverflowServer() as server:
        dest = everflow(server, event_mapping={"Joined VIP": "5"})
        outcomes = send(dest, make_delivery(dest), [member("u1")], connection)
        assert outcomes["u1"].status == "accepted"
        [request] = server.requests
        assert request.query == {"nid": "1", "transaction_id": "tid-u1", "adv_event_id": "5"}


def test_everflow_unmapped_event_is_skipped_without_request(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        dest = everflow(server, event_mapping={"Audience Entered": 3})
        done, calls, _ = prepare(dest, [member("u1", False)])
        assert calls == []
        [outcome] = done
        assert outcome.status == "skipped"
        assert "Audience Exited" in (outcome.reason or "")
        assert deliver(make_delivery(dest), calls) == []
        assert server.requests == []


def test_everflow_requires_transaction_id(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        dest = everflow(server)
        missing = change("u1", email="u1@example.com")
        empty = change("u2", email="u2@example.com", transaction_id="")
        message = build_message(CONNECTION, missing, NOW)
        assert (dest.check(missing, message) or "").startswith("Everflow requires a TransactionId")
        outcomes = send(dest, make_delivery(dest), [missing, empty, member("u3")])
        assert [outcomes[u].status for u in ("u1", "u2", "u3")] == ["rejected", "rejected", "accepted"]
        assert "Everflow requires a TransactionId" in (outcomes["u2"].reason or "")
        assert [r.query["transaction_id"] for r in server.requests] == ["tid-u3"]


def test_everflow_postback_is_received_even_when_everflow_rejects_the_conversion(
    make_delivery: MakeDelivery,
) -> None:
    # REFERENCE.md (Everflow): a postback answers 200 even when the conversion is rejected; the reason shows
    # only in Everflow's reports. The run can only count it as received.
    with EverflowServer(network_id="7") as server:
        dest = everflow(server, network_id="8")
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "accepted"
        assert len(server.requests) == 1
        assert not server.conversions
        assert [reason for *_, reason in server.report] == ["invalid network id"]


def test_everflow_postback_carries_aid_and_mapped_params(make_delivery: MakeDelivery) -> None:
    # Everflow helpdesk, advertiser server postbacks: aid, amount, order_id, coupon_code, email, adv1..adv5
    with EverflowServer() as server:
        params = {"amount": "order_total", "order_id": "last_order", "adv1": "plan", "coupon_code": "coupon"}
        dest = everflow(server, aid=42, params=params)
        members = [
            member("u1", order_total=12.5, last_order="o-1", plan="gold", coupon=None),
            member("u2", order_total=None, last_order="", plan="free"),
        ]
        outcomes = send(dest, make_delivery(dest), members)
        assert {o.status for o in outcomes.values()} == {"accepted"}
        sent = {r.query["transaction_id"]: r.query for r in server.requests}
        assert sent["tid-u1"] == {
            "nid": "1",
            "transaction_id": "tid-u1",
            "adv_event_id": "11",
            "aid": "42",
            "amount": "12.5",
            "order_id": "o-1",
            "adv1": "gold",
        }
        assert sent["tid-u2"] == {
            "nid": "1",
            "transaction_id": "tid-u2",
            "adv_event_id": "11",
            "aid": "42",
            "adv1": "free",
        }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"revenue": "order_total"}, "unknown postback parameter(s) revenue"),
        ({"amount": 5}, "settings.params must map postback parameters to trait names"),
        (["amount"], "settings.params must map postback parameters to trait names"),
    ],
)
def test_everflow_params_must_name_documented_parameters(params: Any, message: str) -> None:
    settings = {"tracking_domain": "https://track.example.com", "network_id": "1", "params": params}
    with pytest.raises(ConfigError, match=re.escape(message)):
        destination("everflow", settings)


@pytest.mark.parametrize("field", ["tracking_domain", "network_id"])
def test_everflow_required_settings(field: str) -> None:
    settings = {"tracking_domain": "https://track.example.com", "network_id": "1", field: None}
    with pytest.raises(ConfigError, match=f"settings.{field}"):
        destination("everflow", settings)
    del settings[field]
    with pytest.raises(ConfigError, match=f"settings.{field}"):
        destination("everflow", settings)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("network_id", {"a": 1}, "settings.network_id must be a whole number or text, not {'a': 1}"),
        ("network_id", True, "settings.network_id must be a whole number or text, not True"),
        ("verification_token", ["tok"], "settings.verification_token must be text"),
        ("verification_token", True, "settings.verification_token must be text"),
    ],
)
def test_everflow_settings_of_the_wrong_type(field: str, value: object, error: str) -> None:
    settings = {"tracking_domain": "https://track.example.com", "network_id": "1", field: value}
    with pytest.raises(ConfigError, match=re.escape(error)):
        destination("everflow", settings)


def test_everflow_tracking_domain_rules() -> None:
    with pytest.raises(ConfigError, match=r"tracking_domain.*https://"):
        destination("everflow", {"tracking_domain": "http://track.example.com", "network_id": 1})
    bare = destination(
        "everflow", {"tracking_domain": "track.example.com", "network_id": 1, "event_mapping": EVENTS}
    )
    _, [call], _ = prepare(bare, [member("u1")])
    assert call.url == "https://track.example.com/"
    assert call.method == "GET"
    for loopback in ("http://localhost:8080", "http://127.0.0.1:9", "http://[::1]:9/pb"):
        destination("everflow", {"tracking_domain": loopback, "network_id": 1})


def test_unknown_settings_and_bad_numbers_name_the_field() -> None:
    base = {"tracking_domain": "https://t.example.com", "network_id": 1}
    with pytest.raises(ConfigError, match="tracking_domian"):
        destination("everflow", {**base, "tracking_domian": "x"})
    with pytest.raises(ConfigError, match=r"settings\.rate_limit"):
        destination("everflow", {**base, "rate_limit": 0})
    with pytest.raises(ConfigError, match="kind"):
        destination("impact", base)


def test_every_independent_problem_of_a_destination_is_raised_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_UNSET_KEY", raising=False)
    where = "destinations row id=1 ('Partner')"
    with pytest.raises(ConfigError) as everflow_error:
        destination(
            "everflow",
            {"tracking_domain": "http://t.example.com", "params": ["amount"], "verification_token": 1},
            api_key_env="TEST_UNSET_KEY",
        )
    assert everflow_error.value.problems == [
        f"{where}: api_key_env names 'TEST_UNSET_KEY', which is not set or empty",
        f"{where}: settings.params must map postback parameters to trait names, e.g. "
        '{"amount": "order_total"}',
        f"{where}: settings.tracking_domain: 'http://t.example.com' must use https:// (http is allowed only "
        "for loopback hosts)",
        f"{where}: settings.network_id is required",
        f"{where}: settings.verification_token must be text",
    ]
    assert str(everflow_error.value) == "; ".join(everflow_error.value.problems)
    with pytest.raises(ConfigError) as segment_error:
        destination("refersion", {"transport": "segment", "endpoint": "", "max_attempts": 0})
    assert segment_error.value.problems == [
        f"{where}: settings.max_attempts must be a whole number from 1 to 100, not 0",
        f"{where}: the Segment transport needs an API key",
        f"{where}: settings.endpoint is required: a base URL such as https://example.com",
    ]
    # a key that api_key_env cannot give is one problem, not also a missing key
    with pytest.raises(ConfigError) as refersion_error:
        destination(
            "refersion", {"transport": "segment", "endpoint": "https://in.example.com"}, api_key_env="1x"
        )
    assert refersion_error.value.problems == [
        f"{where}: api_key_env does not hold an environment variable name; put the key itself in the "
        "environment, not in this column"
    ]


def test_everflow_describe_masks_verification_token() -> None:
    dest = destination(
        "everflow",
        {
            "tracking_domain": "https://t.example.com",
            "network_id": 1,
            "verification_token": "tok-Q9z",
            "event_mapping": EVENTS,
        },
    )
    _, [call], _ = prepare(dest, [member("u1")])
    shown = call.describe()
    assert shown["params"]["verification_token"] == "***"
    assert shown["params"]["transaction_id"] == "tid-u1"
    assert "tok-Q9z" not in json.dumps(shown)


# Refersion


def test_refersion_new_affiliate_body(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        dest = refersion(server, offer="12345")
        joiner = change(
            "u1",
            email="ada@example.com",
            name="Ada King Lovelace",
            street="12 St James's Square",
            city="London",
            state="LND",
            postal_code="SW1Y 4JH",
            country="GB",
            phone="+44 20 7946 0000",
            transaction_id="tid-u1",
        )
        done, [call], _ = prepare(dest, [joiner])
        assert done == []
        password = call.json["password"]
        outcome = by_user(deliver(make_delivery(dest), [call]))["u1"]

        [request] = server.requests
        assert (request.method, request.path) == ("POST", "/v2/affiliate/new")
        assert request.headers["refersion-public-key"] == "pub"
        assert request.headers["refersion-secret-key"] == "sec"
        body = dict(request.json)
        assert body.pop("password") == password
        assert body == {
            "first_name": "Ada",  # a name alone is split at its first space
            "last_name": "King Lovelace",
            "email": "ada@example.com",
            "status": "PENDING",
            "send_welcome": "FALSE",
            "offer": "12345",
            "unique_merchant_id": "u1",
            "address1": "12 St James's Square",
            "city": "London",
            "state": "LND",
            "zip": "SW1Y 4JH",
            "country": "GB",
            "phone": "+44 20 7946 0000",
        }
        [stored] = server.affiliates.values()
        assert stored["has_password"] is True
        # Refersion REST API v2 reference: /affiliate/new answers the affiliate's code as `id`; the numeric
        # id, which status_change takes, is only in the message text ("The affiliate 37569297 has been
        # created ..."), read from there
        assert (outcome.status, outcome.remote_code, outcome.remote_id) == (
            "accepted",
            stored["code"],
            str(stored["id"]),
        )
        assert outcome.remote_active is True
        assert server.accepted == {("u1", "new"): 1}


def test_refersion_generated_passwords_meet_the_rules_and_are_masked(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        dest = refersion(server)
        changes = [member(f"u{i}") for i in range(20)]
        done, calls, _ = prepare(dest, changes)
        passwords = [call.json["password"] for call in calls]
        assert len(set(passwords)) == 20  # a new one for every affiliate
        for password, call in zip(passwords, calls, strict=True):
            assert 9 <= len(password) <= 72
            assert all(re.search(rule, password) for rule in PASSWORD_RULES), password
            assert not re.search(r"(.)\1{3}", password)
            shown = call.describe()
            assert shown["json"]["password"] == "***"
            assert shown["json"]["email"] == call.json["email"]
            assert password not in json.dumps(shown)
            assert "sec" not in json.dumps(shown)  # headers (the keys) are never shown
        outcomes = by_user(done + deliver(make_delivery(dest), calls))
        assert {o.status for o in outcomes.values()} == {"accepted"}
        assert len(server.affiliates) == 20  # the server checked every password against the same rules


def test_refersion_settings_status_and_welcome(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        dest = refersion(server, status="ACTIVE", send_welcome=True)
        outcome = send(dest, make_delivery(dest), [change("u1", email="a@example.com", name="Ada Lovelace")])
        assert outcome["u1"].status == "accepted"
        [request] = server.requests
        assert (request.json["status"], request.json["send_welcome"]) == ("ACTIVE", "TRUE")
        assert (request.json["first_name"], request.json["last_name"]) == ("Ada", "Lovelace")
    with pytest.raises(ConfigError, match=r"settings\.status"):
        destination("refersion", {"status": "DENIED"}, api_key="pub.sec")
    with pytest.raises(ConfigError, match=r"settings\.on_exit"):
        destination("refersion", {"on_exit": "delete"}, api_key="pub.sec")


def test_refersion_entry_without_email_or_names_is_rejected_locally(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        dest = refersion(server)
        outcomes = send(
            dest,
            make_delivery(dest),
            [change("u1", name="Ada Lovelace"), change("u2", email="b@example.com", name="Ada")],
        )
        assert outcomes["u1"].status == outcomes["u2"].status == "rejected"
        assert "email" in (outcomes["u1"].reason or "")
        assert "first_name" in (outcomes["u2"].reason or "")
        assert server.requests == []


def test_refersion_email_taken_adopts_the_affiliate_without_changing_its_status(
    make_delivery: MakeDelivery,
) -> None:
    # Refersion REST API v2 reference: 422 "email taken"; /affiliate/search by a partial email answers codes
    # as `id`, paged until `total`; /affiliate/get by code answers the numeric id
    with RefersionServer() as server:
        server.search_page_size = 2
        for prefix in "abcd":  # partial matches of the keyword, found before the exact one
            server.add_affiliate(f"{prefix}u1@example.com")
        existing = server.add_affiliate("U1@Example.com", status="DISABLED")
        dest = refersion(server, on_exit="disable")
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "accepted"
        assert (outcome.change.remote_id, outcome.change.remote_code) == (
            str(existing),
            server.code_of(existing),
        )
        assert "adopted" in (outcome.reason or "")
        assert outcome.remote_active is False  # disabled by someone else: its exit will send nothing
        paths = [r.path.removeprefix("/v2/affiliate/") for r in server.requests]
        assert paths == ["new", "search", "search", "search", "get"]
        assert [r.json.get("page") for r in server.requests[1:4]] == ["1", "2", "3"]
        assert server.affiliates[existing]["status"] == "DISABLED"  # adoption changes no status
        assert len(server.affiliates) == 5


def test_refersion_email_taken_with_no_exact_match_is_rejected(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        server.add_affiliate("xu1@example.com")  # a partial match only
        server.fault(422, '{"errors": ["The email you have entered is taken by another Affiliate."]}')
        dest = refersion(server)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "rejected"
        assert outcome.reason == "no Refersion affiliate has exactly the email 'u1@example.com'"
        assert [r.path for r in server.requests] == ["/v2/affiliate/new", "/v2/affiliate/search"]


def test_refersion_204_is_rejected(make_delivery: MakeDelivery) -> None:
    # REFERENCE.md (Refersion): a 204 with a body means an invalid field, on every operation
    with RefersionServer() as server:
        server.fault(204, '{"errors": ["Invalid offer"]}')
        dest = refersion(server)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "rejected"
        assert "204" in (outcome.reason or "")
        assert len(server.requests) == 1
        assert server.affiliates == {}


@pytest.mark.parametrize(
    ("country", "sent"),
    [("United States", "US"), ("usa", "US"), ("us", "US"), ("United Kingdom", "GB"), ("826", "GB")],
)
def test_refersion_country_is_sent_as_an_iso_code(
    make_delivery: MakeDelivery, country: str, sent: str
) -> None:
    # Refersion REST API v2 reference: /affiliate/new `country` is a two-letter ISO code (minLength 2,
    # maxLength 2)
    with RefersionServer() as server:
        dest = refersion(server)
        assert send(dest, make_delivery(dest), [member("u1", country=country)])["u1"].status == "accepted"
        [request] = server.requests
        assert request.json["country"] == sent


def test_refersion_unmappable_country_is_rejected_locally_with_the_column(
    make_delivery: MakeDelivery,
) -> None:
    with RefersionServer() as server:
        dest = refersion(server)
        outcome = send(dest, make_delivery(dest), [member("u1", country="Narnia")])["u1"]
        assert outcome.status == "rejected"
        assert (outcome.reason or "").startswith("the country column holds 'Narnia', which is not a country")
        assert server.requests == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"error": "offer is not a valid offer"}', "HTTP 400: offer is not a valid offer"),
        ('{"errors": ["zip is invalid", "city is invalid"]}', "HTTP 400: zip is invalid; city is invalid"),
    ],
)
def test_refersion_400_is_rejected_with_server_reason(
    make_delivery: MakeDelivery, body: str, reason: str
) -> None:
    with RefersionServer() as server:
        server.fault(400, body)
        dest = refersion(server)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert (outcome.status, outcome.reason) == ("rejected", reason)
        assert len(server.requests) == 1


def test_refersion_exit_ignored_by_default(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        dest = refersion(server)
        done, calls, _ = prepare(dest, [member("u1", False), change("u2", False, remote_code="ca37")])
        assert calls == []
        assert {o.change.user_id: o.status for o in done} == {"u1": "accepted", "u2": "accepted"}
        assert deliver(make_delivery(dest), calls) == []
        assert server.requests == []


def test_refersion_disable_in_batches_of_50(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        ids = [server.add_affiliate(f"u{i}@example.com") for i in range(120)]
        dest = refersion(server, on_exit="disable")
        exits = [change(f"u{i}", False, remote_id=ids[i], remote_code="unused") for i in range(120)]
        done, calls, _ = prepare(dest, exits)
        assert done == []
        assert [len(call.changes) for call in calls] == [50, 50, 20]
        outcomes = by_user(deliver(make_delivery(dest), calls))
        assert {o.status for o in outcomes.values()} == {"accepted"}
        assert {o.remote_active for o in outcomes.values()} == {False}
        assert len(server.requests) == 3
        assert all(r.path == "/v2/affiliate/status_change" for r in server.requests)
        assert all(r.json["status"] == "DISABLED" and len(r.json["ids"]) <= 50 for r in server.requests)
        # Refersion REST API v2 reference: status_change takes numeric affiliate ids, as integers
        assert all(type(i) is int for r in server.requests for i in r.json["ids"])
        assert sorted(i for r in server.requests for i in r.json["ids"]) == sorted(ids)
        assert {a["status"] for a in server.affiliates.values()} == {"DISABLED"}


def test_refersion_ids_not_changed_stay_pending(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        kept, stuck = server.add_affiliate("u1@example.com"), server.add_affiliate("u2@example.com")
        server.not_changeable.add(stuck)
        dest = refersion(server, on_exit="disable")
        outcomes = send(
            dest,
            make_delivery(dest),
            [change("u1", False, remote_id=kept), change("u2", False, remote_id=stuck)],
        )
        assert outcomes["u1"].status == "accepted"
        assert outcomes["u2"].status == "failed"
        assert "ids_not_changed" in (outcomes["u2"].reason or "")
        assert server.affiliates[kept]["status"] == "DISABLED"
        assert server.affiliates[stuck]["status"] == "ACTIVE"


@pytest.mark.parametrize(
    "body", ['{"ids_changed": 5}', '{"ids_changed": "a001"}', '["a001"]', "null", "<html></html>"]
)
def test_refersion_status_change_answer_of_another_shape_stays_pending(
    make_delivery: MakeDelivery, body: str
) -> None:
    with RefersionServer() as server:
        affiliate = server.add_affiliate("u1@example.com")
        server.fault(200, body=body)
        dest = refersion(server, on_exit="disable")
        outcome = send(dest, make_delivery(dest), [change("u1", False, remote_id=affiliate)])["u1"]
        assert outcome.status == "failed"
        assert "ids_not_changed" in (outcome.reason or "")


def test_message_json_cannot_carry_is_rejected_not_raised(make_delivery: MakeDelivery) -> None:
    with SegmentServer(api_key="k") as server:
        dest = segment(server)
        _, [call], _ = prepare(dest, [member("u1")])
        call.json["traits"]["score"] = float("inf")  # what traits_json turns into text, should one slip by
        [outcome] = deliver(make_delivery(dest), [call])
        assert outcome.status == "rejected"
        assert (outcome.reason or "").startswith("the message cannot be sent as JSON")
        assert server.requests == []


def test_refersion_exit_without_any_affiliate_id_is_looked_up_by_email(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        known = server.add_affiliate("u1@example.com")
        dest = refersion(server, on_exit="disable")
        outcomes = send(
            dest, make_delivery(dest), [member("u1", False), member("u2", False), change("u3", False)]
        )
        assert (outcomes["u1"].status, outcomes["u1"].change.remote_id) == ("accepted", str(known))
        assert outcomes["u1"].remote_active is False
        assert server.affiliates[known]["status"] == "DISABLED"
        assert outcomes["u2"].status == "rejected"
        assert "exactly the email 'u2@example.com'" in (outcomes["u2"].reason or "")
        assert outcomes["u3"].status == "rejected"  # neither a code nor an email: nothing to look up
        assert "no affiliate code and no email" in (outcomes["u3"].reason or "")


def test_refersion_exit_known_by_code_resolves_the_numeric_id_first(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        affiliate = server.add_affiliate("u1@example.com")
        dest = refersion(server, on_exit="disable")
        outcome = send(
            dest, make_delivery(dest), [change("u1", False, remote_code=server.code_of(affiliate))]
        )["u1"]
        assert outcome.status == "accepted"
        assert (outcome.change.remote_id, outcome.remote_active) == (str(affiliate), False)
        get, status_change = server.requests
        assert (get.path, get.json) == ("/v2/affiliate/get", {"affiliate_code": server.code_of(affiliate)})
        assert (status_change.path, status_change.json) == (
            "/v2/affiliate/status_change",
            {"ids": [affiliate], "status": "DISABLED"},
        )


def test_refersion_lookup_that_fails_leaves_the_change_pending(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        affiliate = server.add_affiliate("u1@example.com")
        server.fault(503, times=3)
        dest = refersion(server, on_exit="disable")
        outcome = send(
            dest, make_delivery(dest), [change("u1", False, remote_code=server.code_of(affiliate))]
        )["u1"]
        assert outcome.status == "failed"
        assert [r.path for r in server.requests] == ["/v2/affiliate/get"] * 3
        assert server.affiliates[affiliate]["status"] == "ACTIVE"


def test_refersion_status_change_204_is_rejected_not_retried(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        affiliate = server.add_affiliate("u1@example.com")
        server.fault(204, '{"errors": ["Invalid status"]}')
        dest = refersion(server, on_exit="disable")
        outcome = send(dest, make_delivery(dest), [change("u1", False, remote_id=affiliate)])["u1"]
        assert outcome.status == "rejected"
        assert "204" in (outcome.reason or "")
        assert len(server.requests) == 1


def test_refersion_reentry_reactivates_disabled_affiliate(make_delivery: MakeDelivery) -> None:
    with RefersionServer() as server:
        disabled = server.add_affiliate("u1@example.com", status="DISABLED")
        active = server.add_affiliate("u2@example.com")
        dest = refersion(server, on_exit="disable", status="ACTIVE")
        outcomes = send(
            dest,
            make_delivery(dest),
            [
                change("u1", remote_id=disabled, remote_active=False),  # no email needed: it is known
                change("u2", remote_id=active, remote_active=True),
            ],
        )
        assert (outcomes["u1"].status, outcomes["u1"].remote_active) == ("accepted", True)
        assert outcomes["u2"].status == "accepted"
        [request] = server.requests
        assert (request.path, request.json) == (
            "/v2/affiliate/status_change",
            {"ids": [disabled], "status": "ACTIVE"},
        )
        assert server.affiliates[disabled]["status"] == "ACTIVE"


@pytest.mark.parametrize("on_reentry", ["ignore", "activate"])
def test_refersion_reentry_with_pending_status_follows_on_reentry(
    make_delivery: MakeDelivery, on_reentry: str
) -> None:
    # Refersion REST API v2 reference: status_change cannot set PENDING (ACTIVE, DENIED or DISABLED only)
    with RefersionServer() as server:
        disabled = server.add_affiliate("u1@example.com", status="DISABLED")
        dest = refersion(server, on_exit="disable", status="PENDING", on_reentry=on_reentry)
        entry = send(dest, make_delivery(dest), [change("u1", remote_id=disabled, remote_active=False)])["u1"]
        assert entry.status == "accepted"
        if on_reentry == "activate":
            assert server.affiliates[disabled]["status"] == "ACTIVE"
            assert entry.remote_active is True
            return
        assert server.requests == []  # left disabled, and its next exit has nothing to send
        assert entry.remote_active is None  # the state keeps remote_active false
        assert server.affiliates[disabled]["status"] == "DISABLED"
        done, calls, _ = prepare(dest, [change("u1", False, remote_id=disabled, remote_active=False)])
        assert calls == [] and [o.status for o in done] == ["accepted"]
    with pytest.raises(ConfigError, match=r"settings\.on_reentry must be 'ignore' or 'activate'"):
        destination("refersion", {"on_reentry": "yes"}, api_key="pub.sec")


@pytest.mark.parametrize("key", ["PUBxyzSECxyz", ".SECxyz", "PUBxyz.", ""])
def test_refersion_malformed_key_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError, match="publickey.secretkey") as error:
        destination("refersion", {"api_base": "https://api.example.com/v2"}, api_key=key or None)
    assert "PUBxyz" not in str(error.value)
    assert "SECxyz" not in str(error.value)


def test_refersion_key_from_environment(monkeypatch: pytest.MonkeyPatch, make_delivery: MakeDelivery) -> None:
    monkeypatch.setenv("TEST_REFERSION_KEY", "pub.sec")
    with RefersionServer() as server:
        dest = destination(
            "refersion", {"api_base": server.url + "/v2", **FAST}, api_key_env="TEST_REFERSION_KEY"
        )
        assert send(dest, make_delivery(dest), [member("u1")])["u1"].status == "accepted"
    with pytest.raises(ConfigError, match="TEST_UNSET_KEY"):
        destination("refersion", {}, api_key_env="TEST_UNSET_KEY")


def test_refersion_wrong_key_stops_the_delivery(make_delivery: MakeDelivery) -> None:
    with RefersionServer(public_key="pub", secret_key="sec") as server:
        dest = refersion(server, api_key="pub.wrong")
        delivery = make_delivery(dest)
        outcome = send(dest, delivery, [member("u1")])["u1"]
        assert outcome.status == "failed"
        assert delivery.stopped is not None
        assert delivery.stopped.why is Why.REFUSED
        assert "credentials refused" in delivery.stopped.reason
        assert "401" in delivery.stopped.reason
        assert len(server.requests) == 1  # 401 is not retried
        later = send(dest, delivery, [member("u2"), member("u3")])
        assert {o.status for o in later.values()} == {"failed"}
        assert {o.reason for o in later.values()} == {delivery.stopped.reason}
        assert len(server.requests) == 1  # nothing more was sent
        assert server.affiliates == {}


# Segment-compatible transport


def test_segment_transport_request(make_delivery: MakeDelivery) -> None:
    with SegmentServer(api_key="seg-K3y") as server:
        dest = segment(server, event_mapping=EVENTS, network_id=9)
        done, calls, messages = prepare(dest, [member("u1"), member("u2", False)])
        assert done == []
        outcomes = by_user(deliver(make_delivery(dest), calls))
        assert {o.status for o in outcomes.values()} == {"accepted"}
        assert len(server.requests) == 2
        token = base64.b64encode(b"seg-K3y:").decode()
        for request in server.requests:
            assert (request.method, request.path) == ("POST", "/ingest")
            assert request.headers["authorization"] == f"Basic {token}"
            assert request.headers["content-type"] == "application/json"
            # the catalog's names only (segment-docs src/_data/catalog/destinations.yml, Everflow): the key as
            # `apiKey`, the event mapping as `eventMapping`, a text-map; none of the row's own settings
            assert request.settings == {
                "apiKey": "seg-K3y",
                "eventMapping": {"Audience Entered": "11", "Audience Exited": "0"},
            }
            assert request.json == messages[request.json["userId"]]
        assert [m["userId"] for m in sorted(server.messages, key=lambda m: m["userId"])] == ["u1", "u2"]
        assert server.messages[0]["integrations"] == {"All": False, "Partner": True}
        assert {(m["userId"], m["traits"]["vip_customers"]) for m in server.messages} == {
            ("u1", True),
            ("u2", False),
        }


def test_segment_transport_sends_every_change_but_keeps_kind_validation(make_delivery: MakeDelivery) -> None:
    with SegmentServer() as server:
        flow = segment(server, event_mapping={})  # no mapping: postbacks would skip, the transport sends
        outcomes = send(flow, make_delivery(flow), [member("u1"), change("u2", email="b@example.com")])
        assert outcomes["u1"].status == "accepted"
        assert outcomes["u2"].status == "rejected"
        assert "TransactionId" in (outcomes["u2"].reason or "")
        [message] = server.messages
        assert message["context"]["referrer"] == {"type": "everflow", "id": "tid-u1"}

        ref = segment(server, kind="refersion", on_exit="disable")  # no Refersion key format needed
        outcomes = send(
            ref, make_delivery(ref), [member("u3"), member("u4", False), change("u5", name="X Y")]
        )
        assert (outcomes["u3"].status, outcomes["u4"].status, outcomes["u5"].status) == (
            "accepted",
            "accepted",
            "rejected",
        )
        assert sorted(m["userId"] for m in server.messages) == ["u1", "u3", "u4"]


def test_segment_transport_wrong_key_stops(make_delivery: MakeDelivery) -> None:
    with SegmentServer(api_key="right") as server:
        dest = destination(
            "everflow", {"transport": "segment", "endpoint": server.url, **FAST}, api_key="wrong"
        )
        delivery = make_delivery(dest)
        outcome = send(dest, delivery, [member("u1")])["u1"]
        assert outcome.status == "failed"
        assert delivery.stopped and "401" in delivery.stopped.reason
        assert server.messages == []
    with pytest.raises(ConfigError, match="API key"):
        destination("everflow", {"transport": "segment", "endpoint": "https://in.example.com"})
    with pytest.raises(ConfigError, match="endpoint"):
        destination("everflow", {"transport": "segment", "endpoint": "http://in.example.com"}, api_key="k")


# Delivery: retries and giving up


def test_503_then_success_is_accepted(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        server.fault(503)
        dest = everflow(server)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "accepted"
        assert len(server.requests) == 2
        assert server.accepted == {("tid-u1", "11"): 1}


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retried_statuses(make_delivery: MakeDelivery, status: int) -> None:
    with EverflowServer() as server:
        server.fault(status, times=2)
        dest = everflow(server)
        assert send(dest, make_delivery(dest), [member("u1")])["u1"].status == "accepted"
        assert len(server.requests) == 3


@pytest.mark.parametrize("status", [400, 404, 422, 501])
def test_final_statuses_are_rejected_without_retry(make_delivery: MakeDelivery, status: int) -> None:
    with EverflowServer() as server:
        server.fault(status, '{"error": "no good"}')
        dest = everflow(server)
        delivery = make_delivery(dest)
        outcome = send(dest, delivery, [member("u1")])["u1"]
        assert (outcome.status, outcome.reason) == ("rejected", f"HTTP {status}: no good")
        assert len(server.requests) == 1
        assert delivery.stopped is None


def test_429_retry_after_is_honoured(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        server.fault(429, headers={"Retry-After": "1"})
        dest = everflow(server)
        started = time.monotonic()
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        elapsed = time.monotonic() - started
        assert outcome.status == "accepted"
        assert len(server.requests) == 2
        assert 0.95 <= elapsed < 3, elapsed


def test_429_retry_after_as_http_date_is_honoured(make_delivery: MakeDelivery) -> None:
    """Retry-After may also be an HTTP date (RFC 9110); it is honoured the same way."""
    with EverflowServer() as server:
        when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
        server.fault(429, headers={"Retry-After": when})
        dest = everflow(server)
        started = time.monotonic()
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        elapsed = time.monotonic() - started
        assert outcome.status == "accepted"
        assert len(server.requests) == 2
        assert 0.9 <= elapsed < 4, elapsed


def test_permanent_500_fails_after_max_attempts(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        server.fault(500, '{"error": "database is down"}', times=100)
        dest = everflow(server, max_attempts=4)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "failed"
        assert "4 attempts" in (outcome.reason or "")
        assert "HTTP 500: database is down" in (outcome.reason or "")
        assert len(server.requests) == 4
        assert not server.accepted


def test_connection_reset_is_retried(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        server.reset_connection(2)
        dest = everflow(server)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "accepted"
        assert len(server.requests) == 3
        assert server.accepted == {("tid-u1", "11"): 1}


def test_connection_resets_exhaust_the_budget(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        server.reset_connection(10)
        dest = everflow(server, max_attempts=2)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "failed"
        assert f"connection to {server.url.removeprefix('http://')} failed" in (outcome.reason or "")
        assert len(server.requests) == 2


def test_timeout_fails_with_a_reason_that_says_so(make_delivery: MakeDelivery) -> None:
    with EverflowServer(delay=1.0) as server:
        dest = everflow(server, timeout=0.2, max_attempts=2)
        started = time.monotonic()
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert time.monotonic() - started < 1.5
        assert outcome.status == "failed"
        assert "no answer within 0.2s" in (outcome.reason or "")
        assert "2 attempts" in (outcome.reason or "")
        assert len(server.requests) == 2


SLOW = "answer still arriving after 0.5s, not read"


@pytest.mark.parametrize(
    ("status", "outcome", "reason"),
    [
        (200, "accepted", None),
        (400, "rejected", f"HTTP 400: {SLOW}"),
        (401, "failed", f"stopped: credentials refused (HTTP 401: {SLOW})"),
    ],
)
def test_answer_dribbled_past_the_timeout_is_cut_off_and_taken_by_its_status(
    make_delivery: MakeDelivery, status: int, outcome: str, reason: str | None
) -> None:
    """Each byte within the timeout, the whole body far past it: reading stops at `timeout`, the status
    still decides (Everflow takes any 2xx; a 401 stops the destination), the body is not read."""
    with EverflowServer() as server:
        server.fault(status, json.dumps({"error": "x" * 40}), dribble=0.1)  # about 5 s
        dest = everflow(server, timeout=0.5)
        started = time.monotonic()
        got = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert time.monotonic() - started < 2
        assert (got.status, got.reason) == (outcome, reason)
        assert len(server.requests) == 1


def test_most_calls_failing_gives_up_for_the_run(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        server.fault(500, times=1000)
        dest = everflow(server, max_attempts=2)
        delivery = make_delivery(dest)
        outcomes = send(dest, delivery, [member(f"u{i}") for i in range(6)])
        assert {o.status for o in outcomes.values()} == {"failed"}
        assert len(server.requests) == 12
        assert delivery.stopped is not None
        assert delivery.stopped.why is Why.FAILING
        assert "gave up" in delivery.stopped.reason
        later = send(dest, delivery, [member("u7"), member("u8")])
        assert {o.status for o in later.values()} == {"failed"}
        assert {o.reason for o in later.values()} == {delivery.stopped.reason}
        assert len(server.requests) == 12


def test_a_few_failures_do_not_stop_the_delivery(make_delivery: MakeDelivery) -> None:
    with EverflowServer() as server:
        server.fault(500)
        dest = everflow(server, max_attempts=1)
        delivery = make_delivery(dest)
        outcomes = send(dest, delivery, [member(f"u{i}") for i in range(6)])
        statuses = sorted(o.status for o in outcomes.values())
        assert statuses == ["accepted"] * 5 + ["failed"]
        assert delivery.stopped is None
        assert len(server.accepted) == 5


def test_failing_pages_give_up_across_send_all_calls(make_delivery: MakeDelivery) -> None:
    """The runner sends one page of `max_in_flight` changes per send_all; most recent requests failing
    must stop the destination even when each page holds fewer than four calls (DESIGN.md section 6)."""
    with EverflowServer() as server:
        server.fault(500, times=1000)
        dest = everflow(server, max_attempts=2, max_in_flight=2)
        delivery = make_delivery(dest)
        for page in range(10):
            if delivery.stopped:
                break
            send(dest, delivery, [member(f"p{page}a"), member(f"p{page}b")])
        assert delivery.stopped is not None, (
            f"still sending after {len(server.requests)} failed requests to a dead destination"
        )
        assert "gave up" in delivery.stopped.reason
        assert len(server.requests) < 40


# Delivery: answers too large to read

MIB = 1024 * 1024
TOO_LARGE = "answer of more than 1 MiB, not read"


class CountingTransport(httpx.HTTPTransport):
    """The real HTTP transport, counting the answer bytes the client took from the network."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _Counted(response.stream, self)
        return response


class _Counted(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, transport: CountingTransport) -> None:
        self.stream = stream
        self.transport = transport

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.stream:
            self.transport.received += len(chunk)
            yield chunk

    def close(self) -> None:
        self.stream.close()


@pytest.mark.parametrize(
    ("status", "outcome", "reason"),
    [
        (400, "rejected", f"HTTP 400: {TOO_LARGE}"),
        (502, "failed", f"gave up after 3 attempts: HTTP 502: {TOO_LARGE}"),
    ],
)
def test_answer_too_large_is_not_read(status: int, outcome: str, reason: str) -> None:
    """An answer of many MB gets a short reason, is not read whole, and leaves the Sender working."""
    transport = CountingTransport()
    with EverflowServer() as server:
        dest = everflow(server)
        sender = Sender(dest, httpx.Client(transport=transport, timeout=5))
        try:
            server.fault(status, json.dumps({"error": "x" * (16 * MIB)}), times=3)
            delivery = Delivery(sender)
            first = send(dest, delivery, [member("u1")])["u1"]
            assert (first.status, first.reason) == (outcome, reason)
            attempts = len(server.requests)
            assert transport.received <= attempts * (MIB + 64 * 1024)
            server.clear_faults()
            assert send(dest, delivery, [member("u2")])["u2"].status == "accepted"
            assert server.accepted == {("tid-u2", "11"): 1}
        finally:
            sender.close()


@pytest.mark.parametrize(("extra", "reason"), [(0, "HTTP 400: no good"), (1, f"HTTP 400: {TOO_LARGE}")])
def test_answer_of_exactly_1_mib_is_read(make_delivery: MakeDelivery, extra: int, reason: str) -> None:
    with EverflowServer() as server:
        body = '{"error": "no good"}'
        server.fault(400, body + " " * (MIB - len(body) + extra))
        dest = everflow(server)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert (outcome.status, outcome.reason) == ("rejected", reason)


def test_refersion_create_answer_too_large_is_not_accepted(make_delivery: MakeDelivery) -> None:
    """An id at the head of an answer too large to read is not taken: the affiliate stays pending."""
    with RefersionServer() as server:
        server.fault(200, json.dumps({"id": "a999", "link": "x", "message": "x" * (8 * MIB)}))
        dest = refersion(server)
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "failed"
        assert outcome.remote_id is None
        assert len(server.requests) == 1


def test_chunked_answers_are_read_up_to_the_bound() -> None:
    """Without Content-Length: a small answer in chunks is read whole, a huge one only up to 1 MiB."""
    pulled = 0

    def huge() -> Iterator[bytes]:  # 64 MiB, finite so that a client reading it all still ends
        nonlocal pulled
        for _ in range(1024):
            pulled += 1
            yield b"x" * 65536

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["unique_merchant_id"] == "u1":
            return httpx.Response(200, content=iter([b'{"id": "a7", ', b'"message": "Affiliate created"}']))
        return httpx.Response(400, content=huge())

    dest = destination("refersion", {"api_base": "http://127.0.0.1:9/v2", **FAST}, api_key="pub.sec")
    sender = Sender(dest, httpx.Client(transport=httpx.MockTransport(handler)))
    try:
        outcomes = send(dest, Delivery(sender), [member("u1")])
        assert (outcomes["u1"].status, outcomes["u1"].remote_code) == ("accepted", "a7")
        outcomes = send(dest, Delivery(sender), [member("u2")])
        assert (outcomes["u2"].status, outcomes["u2"].reason) == ("rejected", f"HTTP 400: {TOO_LARGE}")
        assert pulled == 17  # 16 chunks make 1 MiB; the 17th goes past it
    finally:
        sender.close()


# Delivery: secrets


TOKEN = "tok-Vx81Qa"  # Everflow verification token
SEGMENT_KEY = "segKEY-5521"


def test_everflow_token_echoed_by_server_never_reaches_outcomes(make_delivery: MakeDelivery) -> None:
    with EverflowServer(verification_token=TOKEN) as server:
        dest = everflow(server, verification_token=TOKEN, max_attempts=2)
        server.fault(400, json.dumps({"error": f"bad postback verification_token={TOKEN}"}))
        server.fault(500, f"upstream failed for token {TOKEN}", times=2)
        rejected_one = send(dest, make_delivery(dest), [member("u1")])["u1"]
        failed_one = send(dest, make_delivery(dest), [member("u2")])["u2"]
        assert rejected_one.status == "rejected"
        assert failed_one.status == "failed"
        assert "bad postback" in (rejected_one.reason or "")
        assert "upstream failed" in (failed_one.reason or "")
        server.fault(403, json.dumps({"errors": [f"token {TOKEN} is not valid"]}))
        delivery = make_delivery(dest)
        stopped = send(dest, delivery, [member("u3")])["u3"]
        assert stopped.status == "failed"
        assert delivery.stopped and "403" in delivery.stopped.reason
        shown = reasons([rejected_one, failed_one, stopped]) + delivery.stopped.reason
        assert TOKEN not in shown
        assert len(server.requests) == 4


def test_refersion_keys_echoed_by_server_never_reach_outcomes(make_delivery: MakeDelivery) -> None:
    public, secret = "pubKEY-3141", "secKEY-2718"
    with RefersionServer(public_key=public, secret_key=secret) as server:
        dest = refersion(server, api_key=f"{public}.{secret}", max_attempts=2)
        echo = (
            f"headers were Refersion-Public-Key: {public}, Refersion-Secret-Key: {secret} ({public}.{secret})"
        )
        server.fault(400, json.dumps({"error": echo}))
        server.fault(502, echo, times=2)
        server.fault(401, json.dumps({"errors": [echo]}))
        first = send(dest, make_delivery(dest), [member("u1")])
        second = send(dest, make_delivery(dest), [member("u2")])
        delivery = make_delivery(dest)
        third = send(dest, delivery, [member("u3")])
        assert (first["u1"].status, second["u2"].status, third["u3"].status) == (
            "rejected",
            "failed",
            "failed",
        )
        assert delivery.stopped is not None
        shown = reasons(first) + reasons(second) + reasons(third) + delivery.stopped.reason
        assert "headers were" in shown
        assert public not in shown
        assert secret not in shown
        assert len(server.requests) == 4


def test_segment_key_echoed_by_server_never_reaches_outcomes(make_delivery: MakeDelivery) -> None:
    with SegmentServer(api_key=SEGMENT_KEY) as server:
        dest = segment(server)
        server.fault(400, json.dumps({"error": f"key {SEGMENT_KEY} may not send identify"}))
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "rejected"
        assert "may not send identify" in (outcome.reason or "")
        assert SEGMENT_KEY not in (outcome.reason or "")


def test_url_encoded_token_echoed_by_server_never_reaches_outcomes(make_delivery: MakeDelivery) -> None:
    """A base64-like token is URL-encoded in the postback; a server echoing its request line leaks it."""
    token = "Zm9v+YmFy/YmF6=="
    encoded = str(httpx.QueryParams({"verification_token": token})).partition("=")[2]
    assert encoded != token
    with EverflowServer(verification_token=token) as server:
        dest = everflow(server, verification_token=token)
        server.fault(400, f"Bad request: GET /?nid=1&verification_token={encoded}")
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "rejected"
        assert "Bad request" in (outcome.reason or "")
        assert encoded not in (outcome.reason or "")


def test_token_cut_by_reason_truncation_never_reaches_outcomes(make_delivery: MakeDelivery) -> None:
    """Error text is shortened; a secret straddling the cut must not leave its head behind."""
    with EverflowServer(verification_token=TOKEN) as server:
        dest = everflow(server, verification_token=TOKEN)
        server.fault(400, "x" * 294 + f" {TOKEN} was refused")
        outcome = send(dest, make_delivery(dest), [member("u1")])["u1"]
        assert outcome.status == "rejected"
        assert TOKEN[:5] not in (outcome.reason or "")


# Rate limiting


def test_rate_limit_avoids_429s(make_delivery: MakeDelivery) -> None:
    with EverflowServer(rate_limit=10) as server:
        dest = everflow(server, rate_limit=10, max_in_flight=8)
        started = time.monotonic()
        outcomes = send(dest, make_delivery(dest), [member(f"u{i}") for i in range(15)])
        elapsed = time.monotonic() - started
        assert {o.status for o in outcomes.values()} == {"accepted"}
        assert server.throttled == 0
        assert len(server.requests) == 15
        assert len(server.accepted) == 15
        assert elapsed >= 1.3, elapsed  # 15 requests 0.1 s apart


def test_rate_limiter_spaces_threads() -> None:
    limiter = RateLimiter(20)
    stamps: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        limiter.wait()
        with lock:
            stamps.append(time.monotonic())

    threads = [threading.Thread(target=take) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps.sort()
    # none before its slot, 1/20 s apart (a thread may wake late, never early: no gap between two is exact)
    assert all(stamp - started >= i * 0.05 for i, stamp in enumerate(stamps)), stamps


def test_rate_limiter_pause_holds_back() -> None:
    limiter = RateLimiter(1000)
    limiter.wait()
    limiter.pause(0.3)
    started = time.monotonic()
    limiter.wait()
    assert time.monotonic() - started >= 0.28


def _judged(answers: list[tuple[int, str]]) -> tuple[list[Outcome], Delivery]:
    """Outcomes of one Segment request per answer (status, message), sent one page at a time."""
    replies = iter(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        status, message = next(replies)
        return httpx.Response(status, json={"message": message})

    dest = destination("refersion", {"transport": "segment", "endpoint": "http://127.0.0.1:9", **FAST}, "k")
    sender = Sender(dest, httpx.Client(transport=httpx.MockTransport(handler)))
    delivery = Delivery(sender)
    outcomes: list[Outcome] = []
    try:
        for i in range(len(answers)):
            _, calls, _ = prepare(dest, [member(f"u{i:02d}")])
            outcomes += delivery.send_all(calls)
        return outcomes + delivery.held(), delivery
    finally:
        sender.close()


def test_ten_requests_refused_alike_are_the_destinations_refusal_not_the_users() -> None:
    outcomes, delivery = _judged([(404, "Not Found")] * 12)
    assert [o.status for o in outcomes] == ["failed"] * 12  # pending: the last two were not even sent
    assert delivery.stopped is not None and delivery.stopped.why is Why.REFUSED_ALIKE
    assert delivery.stopped.reason.startswith("stopped: the first 10 requests were all refused alike")


@pytest.mark.parametrize(
    "answers",
    [
        [(400, "Missing email address")] * 9 + [(200, "ok")],  # then one was accepted
        [(400, "Missing email address")] * 5 + [(400, "Invalid phone")] * 5,  # refusals that differ
    ],
)
def test_refusals_are_the_users_once_the_destination_accepted_or_they_differ(
    answers: list[tuple[int, str]],
) -> None:
    outcomes, delivery = _judged(answers)
    assert delivery.stopped is None
    refused = sum(1 for status, _ in answers if status == 400)
    assert Counter(o.status for o in outcomes) == Counter(rejected=refused, accepted=len(answers) - refused)


def test_refusals_alike_held_at_the_end_with_nothing_accepted_stay_pending() -> None:
    outcomes, delivery = _judged([(400, "Missing email address")] * 3)
    assert delivery.stopped is None
    assert [o.status for o in outcomes] == ["failed"] * 3
    assert (outcomes[0].reason or "").startswith("refused (HTTP 400: Missing email address) while nothing")


def test_refersion_exit_of_an_affiliate_denied_by_someone_else_sends_no_status_change(
    make_delivery: MakeDelivery,
) -> None:
    with RefersionServer() as server:
        denied = server.add_affiliate("u1@example.com", status="DENIED")
        dest = refersion(server, on_exit="disable")
        outcome = send(dest, make_delivery(dest), [member("u1", False)])["u1"]  # known by email only
        assert (outcome.status, outcome.remote_active) == ("accepted", False)
        assert [r.path for r in server.requests] == ["/v2/affiliate/search", "/v2/affiliate/get"]
        assert server.affiliates[denied]["status"] == "DENIED"


@pytest.mark.parametrize("path", ["get", "search"])
def test_refersion_lookup_answered_204_is_rejected(make_delivery: MakeDelivery, path: str) -> None:
    # REFERENCE.md (Refersion): a 204 means an invalid field, on every operation
    with RefersionServer() as server:
        affiliate = server.add_affiliate("u1@example.com")
        dest = refersion(server, on_exit="disable")
        code = server.code_of(affiliate) if path == "get" else None
        server.fault(204, '{"errors": ["Invalid field"]}')
        exit_ = change("u1", False, remote_code=code, email="u1@example.com")
        outcome = send(dest, make_delivery(dest), [exit_])["u1"]
        assert outcome.status == "rejected"
        assert "HTTP 204" in (outcome.reason or "")
