"""Verifying Everflow postbacks against the sandbox's reporting endpoints, over real HTTP on loopback.

Postbacks go to the sandbox as the product sends them; the sandbox records each as Everflow would (counted,
or rejected with its error code), tests change those records behind the product's back, and `verify` reads
them back through the Network API's conversion report and events endpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from sync.destinations import everflow_reports, load_destination
from sync.destinations.everflow import Everflow
from sync.destinations.everflow_reports import (
    CANNOT_VERIFY,
    CONFIRMED,
    NOT_FOUND,
    PENDING,
    REJECTED,
    WINDOW_SENDS,
    CannotVerify,
    Sent,
    Verdict,
    reporting_configured,
    verify,
)
from sync.errors import ConfigError
from sync.sandbox import EverflowServer
from tests.conftest import free_port

KEY_ENV = "TEST_EVERFLOW_REPORTING_KEY"
KEY = "network-key"  # the sandbox's reporting key
EVENTS = {"Audience Entered": 3, "Audience Exited": 4}
NAMES = {"3": "Audience Entered", "4": "Audience Exited"}  # as the events are named in Everflow
FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "max_attempts": 3, "timeout": 5}
GRACE = timedelta(hours=1)
REPORT = "/v1/networks/reporting/conversions"


def destination(server: EverflowServer, api_key: str | None = None, **settings: Any) -> Everflow:
    values = {
        "tracking_domain": server.url,
        "network_id": "1",
        "event_mapping": EVENTS,
        "reporting_api_key_env": KEY_ENV,
        "reporting_api_base": server.url + "/v1",
        **FAST,
        **settings,
    }
    row = SimpleNamespace(id=1, name="Partner", kind="everflow", api_key=api_key, api_key_env=None)
    dest = load_destination(row, json.dumps({k: v for k, v in values.items() if v is not None}))  # type: ignore[arg-type]
    assert isinstance(dest, Everflow)
    return dest


def postback(server: EverflowServer, transaction_id: str, adv_event_id: str | None = None) -> datetime:
    """Send a postback as the product does; when it was answered."""
    params = {"nid": "1", "transaction_id": transaction_id}
    if adv_event_id:
        params["adv_event_id"] = adv_event_id
    assert httpx.get(server.url + "/", params=params).status_code == 200
    return datetime.now(UTC)


def sent(user_id: str, adv_event_id: str | None, at: datetime) -> Sent:
    return Sent(user_id, f"tid-{user_id}", adv_event_id, at)


def outcomes(verdicts: Iterator[Verdict]) -> dict[str, Verdict]:
    return {v.user_id: v for v in verdicts}


def api_requests(server: EverflowServer) -> list[str]:
    return [r.path for r in server.requests if r.path.startswith("/v1/")]


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def everflow(key: None) -> Iterator[EverflowServer]:
    with EverflowServer(events=NAMES) as server:
        yield server


# What is confirmed, rejected, missing or pending


def test_received_postbacks_are_confirmed_with_everflows_time(everflow: EverflowServer) -> None:
    before = datetime.now(UTC)
    sends = [
        sent(f"u{i}", "3" if i % 2 else None, postback(everflow, f"tid-u{i}", "3" if i % 2 else None))
        for i in range(6)
    ]
    everflow.add_conversion("tid-other", "3", at=before)  # the rest of the network's traffic
    now = datetime.now(UTC)
    found = outcomes(verify(destination(everflow), sends, now=now, grace=GRACE))
    assert {v.outcome for v in found.values()} == {CONFIRMED}
    assert all(before - timedelta(seconds=1) <= (v.at or before) <= now for v in found.values())
    assert all(v.error_code is None and v.reason is None for v in found.values())
    assert api_requests(everflow) == [REPORT]  # six transactions, base conversions among them: one report


def test_a_re_entry_is_reported_as_a_duplicate_with_the_advice_and_not_as_confirmed(
    everflow: EverflowServer,
) -> None:
    entered = datetime.now(UTC) - timedelta(hours=3)
    everflow.add_conversion("tid-u1", "3", at=entered)  # the first entry, counted
    again = postback(everflow, "tid-u1", "3")  # the re-entry's "Audience Entered" for the same click
    dest = destination(everflow)
    now = datetime.now(UTC)
    [verdict] = verify(dest, [sent("u1", "3", again)], now=now, grace=GRACE)
    assert (verdict.outcome, verdict.error_code) == (REJECTED, 8)
    assert verdict.reason is not None
    assert verdict.reason.startswith("error 8: Duplicate Conversion")
    assert 'turn on "Allow Duplicate Conversion" on advertiser event 3' in verdict.reason
    assert "not repaired" in verdict.reason
    # both sends read together: each takes the row nearest its own time
    both = list(verify(dest, [sent("u1", "3", entered), sent("u1", "3", again)], now=now, grace=GRACE))
    assert [v.outcome for v in both] == [CONFIRMED, REJECTED]


def test_a_postback_sent_again_after_its_answer_was_lost_is_confirmed_not_a_duplicate(
    everflow: EverflowServer,
) -> None:
    """Everflow counted the first request, whose answer was lost (in doubt), and refused the one sent again
    seconds later as a duplicate; the state holds the second one's time."""
    first = datetime.now(UTC) - timedelta(hours=2)
    everflow.add_conversion("tid-u1", "3", at=first)
    everflow.add_conversion(
        "tid-u1", "3", at=first + timedelta(seconds=12), error=(8, "Duplicate Conversion")
    )
    [verdict] = verify(
        destination(everflow),
        [sent("u1", "3", first + timedelta(seconds=13))],
        now=datetime.now(UTC),
        grace=GRACE,
    )
    assert (verdict.outcome, verdict.error_code) == (CONFIRMED, None)


@pytest.mark.parametrize("paging", [None, {"page": 1, "page_size": 500, "total_count": 10**9}])
def test_a_report_that_ignores_the_page_asked_for_ends(key: None, paging: dict[str, int] | None) -> None:
    """REFERENCE.md gives the report's answer as {"conversions": [...]} alone: one that answers page 1 again
    (with no paging object, or one that promises more) is read once, not forever."""
    now = datetime.now(UTC)
    row = {"conversion_id": "c1", "transaction_id": "tid-u1", "is_event": False, "status": "approved"}
    row["conversion_unix_timestamp"] = int(now.timestamp()) - 60
    full_page = [row] + [dict(row, conversion_id=f"x{i}", transaction_id="other") for i in range(499)]
    answers: list[int] = []

    def report(request: httpx.Request) -> httpx.Response:
        answers.append(int(request.url.params["page"]))
        assert len(answers) < 5, answers
        return httpx.Response(200, json={"conversions": full_page, **({"paging": paging} if paging else {})})

    with EverflowServer(events=NAMES) as server:
        dest = destination(server)
    sends = [Sent("u1", "tid-u1", None, now - timedelta(minutes=1))]
    found = list(verify(dest, sends, now=now, grace=GRACE, transport=httpx.MockTransport(report)))
    assert [v.outcome for v in found] == [CONFIRMED]
    assert answers == [1, 2]  # page 2 came back as page 1: the report ends there


def test_an_event_that_allows_duplicates_confirms_the_re_entry(key: None) -> None:
    with EverflowServer(events=NAMES, allow_duplicates={"3"}) as server:
        server.add_conversion("tid-u1", "3", at=datetime.now(UTC) - timedelta(hours=3))
        again = postback(server, "tid-u1", "3")
        postback(server, "tid-u2", "4")
        postback(server, "tid-u2", "4")
        [verdict] = verify(destination(server), [sent("u1", "3", again)], now=datetime.now(UTC), grace=GRACE)
        assert verdict.outcome == CONFIRMED
        # event 4 does not allow them
        assert [c.error_code for c in server.reports.conversions if c.transaction_id == "tid-u2"] == [0, 8]


def test_a_dropped_conversion_is_pending_within_the_grace_period_then_not_found(
    everflow: EverflowServer,
) -> None:
    at = postback(everflow, "tid-u1", "3")
    base = postback(everflow, "tid-u2")
    assert everflow.drop_conversions("tid-u1") == 1
    assert everflow.drop_conversions("tid-u2") == 1
    dest, sends = destination(everflow), [sent("u1", "3", at), sent("u2", None, base)]
    soon = outcomes(verify(dest, sends, now=datetime.now(UTC), grace=GRACE))
    assert [soon[u].outcome for u in ("u1", "u2")] == [PENDING, PENDING]
    assert soon["u2"].reason == (
        "Everflow's report shows no conversion for transaction tid-u2, base conversion yet: it was sent "
        "0 min ago, inside the 60 min grace period"
    )
    later = outcomes(verify(dest, sends, now=datetime.now(UTC) + 2 * GRACE, grace=GRACE))
    assert [later[u].outcome for u in ("u1", "u2")] == [NOT_FOUND, NOT_FOUND]
    assert later["u1"].reason == (
        "Everflow holds no conversion for transaction tid-u1, advertiser event 3 within 10 min of its sending"
    )
    assert later["u2"].at is None and later["u2"].error_code is None


def test_a_conversion_rejected_by_hand_or_by_a_rule_is_rejected_with_everflows_code(key: None) -> None:
    with EverflowServer(events=NAMES, clicks={"tid-u1", "tid-u3"}) as server:
        sends = [sent(u, "3", postback(server, f"tid-{u}", "3")) for u in ("u1", "u2", "u3")]
        assert server.reject_conversions("tid-u3") == 1
        found = outcomes(verify(destination(server), sends, now=datetime.now(UTC), grace=GRACE))
    assert found["u1"].outcome == CONFIRMED
    assert (found["u2"].outcome, found["u2"].error_code, found["u2"].reason) == (
        REJECTED,
        13,
        "error 13: Invalid Click",
    )
    assert (found["u3"].outcome, found["u3"].error_code) == (REJECTED, 9)
    assert found["u3"].at is not None


def test_an_event_everflow_names_otherwise_is_not_found_with_the_names_it_shows(key: None) -> None:
    with EverflowServer(events={"3": "Signup"}) as server:
        at = postback(server, "tid-u1", "3")
        [verdict] = verify(
            destination(server), [sent("u1", "3", at)], now=datetime.now(UTC) + 2 * GRACE, grace=GRACE
        )
    assert verdict.outcome == NOT_FOUND
    assert "it shows event(s) 'Signup' for this transaction, which settings.event_mapping does not name" in (
        verdict.reason or ""
    )


def test_a_few_events_are_looked_up_by_transaction_and_a_404_falls_back_to_the_report(
    everflow: EverflowServer,
) -> None:
    at = postback(everflow, "tid-u1", "3")
    dest = destination(everflow)
    [verdict] = verify(dest, [sent("u1", "3", at)], now=datetime.now(UTC), grace=GRACE)
    assert verdict.outcome == CONFIRMED
    assert api_requests(everflow) == ["/v1/networks/reporting/events/tid-u1"]
    everflow.requests.clear()
    # a transaction Everflow holds nothing for: the lookup says 404, the report says what is missing
    [verdict] = verify(dest, [sent("u9", "3", at)], now=datetime.now(UTC) + 2 * GRACE, grace=GRACE)
    assert verdict.outcome == NOT_FOUND
    assert api_requests(everflow) == ["/v1/networks/reporting/events/tid-u9", REPORT]


# Reading the report: paging, pacing, retries, the 365 days


def test_the_report_is_read_page_by_page_at_a_pace_within_everflows_rate_limit(
    everflow: EverflowServer,
) -> None:
    everflow.reports.page_max = 3  # a maximum smaller than the page size asked for
    start = datetime.now(UTC)
    for i in range(4):
        everflow.add_conversion(f"tid-other{i}", at=start)
    sends = [sent(f"u{i}", None, postback(everflow, f"tid-u{i}")) for i in range(8)]
    found = outcomes(verify(destination(everflow), sends, now=datetime.now(UTC), grace=GRACE))
    assert {v.outcome for v in found.values()} == {CONFIRMED} and len(found) == 8
    pages = [r for r in everflow.requests if r.path == REPORT]
    assert [r.query["page"] for r in pages] == ["1", "2", "3", "4"]  # 12 rows, 3 a page
    assert {r.headers["x-eflow-api-key"] for r in pages} == {KEY}
    assert all(
        r.json["timezone_id"] == 67 and r.json["show_events"] and r.json["show_conversions"] for r in pages
    )
    assert not everflow.throttled


def test_requests_are_paced_under_the_published_rate(everflow: EverflowServer) -> None:
    everflow.reports.page_max = 1
    sends = [sent(f"u{i}", None, postback(everflow, f"tid-u{i}")) for i in range(6)]
    started = time.monotonic()
    assert len(list(verify(destination(everflow), sends, now=datetime.now(UTC), grace=GRACE))) == 6
    # six pages at 10 requests a second: five intervals of a tenth of a second at least
    assert time.monotonic() - started >= 0.5
    assert everflow.reports.api_requests == 6


def test_a_spent_quota_holds_the_next_request_until_the_window_resets(
    everflow: EverflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the quota is shared with every other user of the network's API: Everflow's answers say what is left
    monkeypatch.setattr(everflow_reports, "QUOTA_WINDOW", 0.4)
    everflow.reports.page_max, everflow.reports.quota, everflow.reports.window = 1, 2, 0.4
    sends = [sent(f"u{i}", None, postback(everflow, f"tid-u{i}")) for i in range(5)]
    started = time.monotonic()
    found = outcomes(verify(destination(everflow), sends, now=datetime.now(UTC), grace=GRACE))
    assert {v.outcome for v in found.values()} == {CONFIRMED} and len(found) == 5
    assert everflow.reports.over_quota == 0 and everflow.reports.api_requests == 5
    assert time.monotonic() - started >= 0.8  # two windows waited for


def test_a_429_or_a_500_is_retried_then_read(everflow: EverflowServer) -> None:
    at = postback(everflow, "tid-u1")
    everflow.fault(429, '{"error": "Too Many Requests"}')
    everflow.fault(500, '{"error": "Internal Server Error"}')
    [verdict] = verify(destination(everflow), [sent("u1", None, at)], now=datetime.now(UTC), grace=GRACE)
    assert verdict.outcome == CONFIRMED
    assert api_requests(everflow) == [REPORT] * 3


def test_a_report_that_keeps_failing_cannot_verify(everflow: EverflowServer) -> None:
    at = postback(everflow, "tid-u1")
    everflow.fault(429, '{"error": "Too Many Requests"}', times=3)
    with pytest.raises(CannotVerify, match=r"no answer after 3 attempt\(s\): HTTP 429: Too Many Requests"):
        list(verify(destination(everflow), [sent("u1", None, at)], now=datetime.now(UTC), grace=GRACE))


def test_a_refused_request_a_wrong_base_or_no_server_cannot_verify(everflow: EverflowServer) -> None:
    sends = [sent("u1", None, postback(everflow, "tid-u1"))]
    now = datetime.now(UTC)
    everflow.fault(400, '{"error": "Invalid date range"}')
    with pytest.raises(
        CannotVerify, match=r"^Everflow refused the report request: HTTP 400: Invalid date range$"
    ):
        list(verify(destination(everflow), sends, now=now, grace=GRACE))
    elsewhere = destination(everflow, reporting_api_base=everflow.url + "/v1/network")
    with pytest.raises(
        CannotVerify, match=r"^Everflow has no conversion report at .*/v1/network: check reporting_api_base"
    ):
        list(verify(elsewhere, sends, now=now, grace=GRACE))
    nobody = destination(everflow, reporting_api_base=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(
        CannotVerify, match=r"no answer after 3 attempt\(s\): ConnectError reaching 127.0.0.1$"
    ):
        list(verify(nobody, sends, now=now, grace=GRACE))


def test_a_send_older_than_the_report_reaches_cannot_be_verified_and_is_not_asked_for(
    everflow: EverflowServer,
) -> None:
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=400), now - timedelta(days=300)
    everflow.add_conversion("tid-u1", at=old)
    everflow.add_conversion("tid-u2", at=recent)
    found = outcomes(
        verify(destination(everflow), [sent("u1", None, old), sent("u2", None, recent)], now=now, grace=GRACE)
    )
    assert found["u1"].outcome == CANNOT_VERIFY
    assert "before the 365 days Everflow's conversion report covers: it cannot be verified" in (
        found["u1"].reason or ""
    )
    assert found["u2"].outcome == CONFIRMED
    [page] = [r for r in everflow.requests if r.path == REPORT]
    assert page.json["from"] == (recent - timedelta(minutes=10)).strftime("%Y-%m-%d %H:%M:%S")


def test_sends_are_read_lazily_a_window_at_a_time(everflow: EverflowServer) -> None:
    now = datetime.now(UTC)
    first = now - timedelta(days=3)
    total = 20 * WINDOW_SENDS
    taken = 0

    def sends() -> Iterator[Sent]:
        nonlocal taken
        for i in range(total):
            taken += 1
            yield Sent(f"u{i}", f"tid-u{i}", None, first + timedelta(seconds=i))

    for i in (0, WINDOW_SENDS + 5, total - 1):  # a few of them reached Everflow
        everflow.add_conversion(f"tid-u{i}", at=first + timedelta(seconds=i))
    ahead, counts = 0, {CONFIRMED: 0, NOT_FOUND: 0}
    for given, verdict in enumerate(verify(destination(everflow), sends(), now=now, grace=GRACE), 1):
        ahead = max(ahead, taken - given)
        counts[verdict.outcome] += 1
    assert counts == {CONFIRMED: 3, NOT_FOUND: total - 3}
    assert ahead <= WINDOW_SENDS  # never more than a window of sends held
    assert everflow.reports.api_requests == 20  # one page per window


# Keys and settings


def test_a_wrong_key_cannot_verify_and_names_the_variable_not_the_key(
    everflow: EverflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = postback(everflow, "tid-u1")
    monkeypatch.setenv(KEY_ENV, "not-the-network-key")
    with pytest.raises(CannotVerify) as refused:
        list(verify(destination(everflow), [sent("u1", None, at)], now=datetime.now(UTC), grace=GRACE))
    assert str(refused.value) == (
        f"Everflow refused the reporting key in {KEY_ENV} (credentials refused (HTTP 401: Invalid API key)): "
        "it must be a Network API key"
    )
    assert "not-the-network-key" not in str(refused.value)
    assert api_requests(everflow) == [REPORT]  # not retried


def test_without_a_usable_key_verify_says_why_before_any_request(
    everflow: EverflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    unset = destination(everflow, reporting_api_key_env=None)
    assert reporting_configured(unset) == (
        "no reporting key: settings.reporting_api_key_env names no environment variable holding an Everflow "
        "Network API key"
    )
    monkeypatch.delenv(KEY_ENV)
    missing = destination(everflow)  # postbacks need no key: the row stays valid
    reason = reporting_configured(missing) or ""
    assert f"names '{KEY_ENV}', which is not set or empty: reconcile cannot read Everflow's reports" in reason
    assert missing.warnings == [f"{reason} (postbacks need no key)"]
    segment = destination(everflow, api_key="k", transport="segment", endpoint=everflow.url)
    assert reporting_configured(segment) == "the Segment transport has no read API to verify postbacks with"
    for dest in (unset, missing, segment):
        with pytest.raises(CannotVerify):
            verify(dest, [], now=datetime.now(UTC), grace=GRACE)
    assert everflow.requests == []


def test_reporting_settings_are_checked_and_the_key_is_a_secret(everflow: EverflowServer) -> None:
    dest = destination(everflow)
    assert reporting_configured(dest) is None
    assert KEY in dest.secrets()
    assert dest.reporting_api_base == everflow.url + "/v1"
    assert destination(everflow, reporting_api_base=None).reporting_api_base == "https://api.eflow.team/v1"
    with pytest.raises(ConfigError) as bad:
        destination(everflow, reporting_api_key_env="ey-pasted-key-value", reporting_api_base="ftp://x")
    assert "settings.reporting_api_key_env does not hold an environment variable name" in str(bad.value)
    assert "pasted" not in str(bad.value)
    assert "settings.reporting_api_base: 'ftp://x' is not a base URL" in str(bad.value)


# The sandbox's reporting endpoints


def report(
    server: EverflowServer, body: dict[str, Any], key: str | None = KEY, **query: Any
) -> httpx.Response:
    headers = {"X-Eflow-API-Key": key} if key else {}
    return httpx.post(server.url + REPORT, json=body, params=query, headers=headers)


def window(days: float = 1) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "from": (now - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S"),
        "to": (now + timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%S"),
        "timezone_id": 67,
        "show_conversions": True,
        "show_events": True,
    }


def test_sandbox_report_rows_paging_and_rate_limit_headers(everflow: EverflowServer) -> None:
    postback(everflow, "t1", "3")
    postback(everflow, "t1", "3")
    postback(everflow, "t1")
    r = report(everflow, window(), page=1, page_size=2)
    assert r.status_code == 200
    assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("900", "899")
    answer = r.json()
    assert answer["paging"] == {"page": 1, "page_size": 2, "total_count": 3}
    rows = answer["conversions"] + report(everflow, window(), page=2, page_size=2).json()["conversions"]
    by_code = {row["error_code"]: row for row in rows if row["is_event"]}
    assert by_code[8]["error_message"] == "Duplicate Conversion" and by_code[8]["status"] == "invalid"
    assert (by_code[0]["event"], by_code[0]["transaction_id"], by_code[0]["status"]) == (
        "Audience Entered",
        "t1",
        "approved",
    )
    [base] = [row for row in rows if not row["is_event"]]
    assert base["event"] == "" and abs(base["conversion_unix_timestamp"] - time.time()) < 5
    events_only = report(everflow, {**window(), "show_conversions": False}).json()
    assert len(events_only["conversions"]) == 2 and events_only["paging"]["page_size"] == 50
    events = httpx.get(everflow.url + "/v1/networks/reporting/events/t1", headers={"X-Eflow-API-Key": KEY})
    assert [e["error_code"] for e in events.json()["events"]] == [0, 8]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"timezone_id": None}, "Missing required field timezone_id"),
        ({"from": "07/12/2026"}, "from and to must be YYYY-mm-DD or YYYY-mm-DD hh:mm:ss"),
        ({"timezone_id": 90}, "the sandbox knows timezone_id 67 (UTC) only"),
        (window(366), "The conversion report is limited to the prior 365 days"),
    ],
)
def test_sandbox_report_refuses_what_the_reference_refuses(
    everflow: EverflowServer, change: dict[str, Any], error: str
) -> None:
    body = {k: v for k, v in {**window(), **change}.items() if v is not None}
    r = report(everflow, body)
    assert (r.status_code, r.json()) == (400, {"error": error})


def test_sandbox_api_keys_paths_and_quota(everflow: EverflowServer) -> None:
    assert (
        report(everflow, window(), key=None).status_code,
        report(everflow, window(), key=None).json(),
    ) == (
        401,
        {"error": "No Authentication Method Found"},
    )
    assert report(everflow, window(), key="other").status_code == 401
    missing = httpx.get(everflow.url + "/v1/networks/reporting/events/none", headers={"X-Eflow-API-Key": KEY})
    assert (missing.status_code, missing.json()) == (404, {"error": "Transaction not found"})
    wrong = httpx.get(everflow.url + "/v1/networks/reporting/clicks", headers={"X-Eflow-API-Key": KEY})
    assert wrong.status_code == 404
    everflow.reports.quota, everflow.reports.window = 3, 0.5  # a window of its own
    time.sleep(0.5)
    answers = [report(everflow, window()) for _ in range(4)]
    assert [(r.status_code, r.headers["X-RateLimit-Remaining"]) for r in answers] == [
        (200, "2"),
        (200, "1"),
        (200, "0"),
        (429, "0"),
    ]
    assert answers[-1].json() == {"error": "Too Many Requests"}
    time.sleep(0.5)  # the window resets
    assert report(everflow, window()).status_code == 200
