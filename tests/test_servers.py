"""The fake destination servers, driven over real HTTP."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.servers import EverflowServer, RefersionServer, SegmentServer

KEYS = {"Refersion-Public-Key": "pub", "Refersion-Secret-Key": "sec"}
AFFILIATE = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada@example.com",
    "password": "Xy7!kq2Lm",
    "status": "PENDING",
    "unique_merchant_id": "u1",
}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


@pytest.fixture
def everflow() -> Iterator[EverflowServer]:
    with EverflowServer(network_id="7") as server:
        yield server


@pytest.fixture
def refersion() -> Iterator[RefersionServer]:
    with RefersionServer() as server:
        yield server


@pytest.fixture
def segment() -> Iterator[SegmentServer]:
    with SegmentServer(api_key="k3y") as server:
        yield server


def postback(client: httpx.Client, server: EverflowServer, **params: str) -> httpx.Response:
    return client.get(server.url + "/", params=params)


def new_affiliate(client: httpx.Client, server: RefersionServer, **changes: Any) -> httpx.Response:
    body = {k: v for k, v in {**AFFILIATE, **changes}.items() if v is not None}
    return client.post(server.url + "/v2/affiliate/new", json=body, headers=KEYS)


def status_change(client: httpx.Client, server: RefersionServer, body: Any) -> httpx.Response:
    return client.post(server.url + "/v2/affiliate/status_change", json=body, headers=KEYS)


def segment_headers(api_key: str = "k3y", settings: Any = None) -> dict[str, str]:
    headers = {"Authorization": "Basic " + base64.b64encode(f"{api_key}:".encode()).decode()}
    if settings is not None:
        headers["X-Segment-Settings"] = base64.b64encode(json.dumps(settings).encode()).decode()
    return headers


MESSAGE = {"type": "identify", "userId": "u1", "messageId": "m1", "traits": {"vip": True}}


# Everflow


def test_everflow_postback_accepted_and_recorded(everflow: EverflowServer, client: httpx.Client) -> None:
    r = postback(client, everflow, nid="7", transaction_id="t1", adv_event_id="3")
    assert (r.status_code, r.text) == (200, "OK")
    assert everflow.accepted == {("t1", "3"): 1}
    [rec] = everflow.requests
    assert (rec.method, rec.path, rec.json) == ("GET", "/", None)
    assert rec.query == {"nid": "7", "transaction_id": "t1", "adv_event_id": "3"}
    assert rec.headers["host"] == everflow.url.removeprefix("http://")


@pytest.mark.parametrize("missing", ["nid", "transaction_id"])
def test_everflow_missing_parameter(everflow: EverflowServer, client: httpx.Client, missing: str) -> None:
    params = {"nid": "7", "transaction_id": "t1", "adv_event_id": "0"}
    del params[missing]
    r = postback(client, everflow, **params)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert missing in r.json()["error"]
    assert not everflow.accepted


def test_everflow_wrong_network(everflow: EverflowServer, client: httpx.Client) -> None:
    r = postback(client, everflow, nid="8", transaction_id="t1", adv_event_id="0")
    assert r.status_code == 404
    assert "error" in r.json()
    assert not everflow.accepted


def test_everflow_verification_token(client: httpx.Client) -> None:
    with EverflowServer(verification_token="tok") as server:
        for token in (None, "bad"):
            params = {"nid": "1", "transaction_id": "t1", "adv_event_id": "0"}
            if token:
                params["verification_token"] = token
            r = postback(client, server, **params)
            assert r.status_code == 403
            assert r.json() == {"error": "Invalid verification token"}
        assert postback(
            client, server, nid="1", transaction_id="t1", adv_event_id="0", verification_token="tok"
        ).is_success
        assert server.accepted == {("t1", "0"): 1}


# Refersion


def test_refersion_new_affiliate(refersion: RefersionServer, client: httpx.Client) -> None:
    r = new_affiliate(client, refersion, country="GB", send_welcome="FALSE")
    assert r.status_code == 200
    body = r.json()
    assert body["message"] == "Affiliate created"
    assert body["link"].startswith("http://")
    stored = refersion.affiliates[body["id"]]
    assert "password" not in stored
    assert stored["has_password"] is True
    assert (stored["email"], stored["status"], stored["unique_merchant_id"]) == (
        "ada@example.com",
        "PENDING",
        "u1",
    )
    assert stored["country"] == "GB"
    assert refersion.accepted == {("u1", "new"): 1}
    # Without unique_merchant_id the email is the key.
    new_affiliate(client, refersion, email="bob@example.com", unique_merchant_id=None).raise_for_status()
    assert refersion.accepted[("bob@example.com", "new")] == 1
    assert len(set(refersion.affiliates)) == 2


@pytest.mark.parametrize(
    "headers", [{}, {**KEYS, "Refersion-Secret-Key": "wrong"}, {"Refersion-Public-Key": "pub"}]
)
def test_refersion_bad_credentials(
    refersion: RefersionServer, client: httpx.Client, headers: dict[str, str]
) -> None:
    r = client.post(refersion.url + "/v2/affiliate/new", json=AFFILIATE, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": "Invalid API credentials (error 2)."}
    assert not refersion.affiliates


@pytest.mark.parametrize("field", ["first_name", "last_name", "email", "password", "status"])
def test_refersion_missing_field(refersion: RefersionServer, client: httpx.Client, field: str) -> None:
    r = new_affiliate(client, refersion, **{field: None})
    assert r.status_code == 400
    assert field in r.json()["error"]
    assert not refersion.affiliates


@pytest.mark.parametrize(
    "password",
    [
        "Ab1!xyzw",  # 8 characters
        "Ab1!" + "xy" * 35,  # 74 characters
        "ab1!xyzwq",  # no upper case
        "AB1!XYZWQ",  # no lower case
        "Abc!xyzwq",  # no digit
        "Ab1cxyzwq",  # no special character
        "Ab1!xxxxq",  # one character 4 times in a row
        "Ab1!x@example.com",  # the email itself
    ],
)
def test_refersion_password_rules(refersion: RefersionServer, client: httpx.Client, password: str) -> None:
    r = new_affiliate(client, refersion, password=password, email="Ab1!x@example.com")
    assert r.status_code == 400
    assert len(r.json()["errors"]) == 1
    assert not refersion.affiliates


def test_refersion_password_edges_allowed(refersion: RefersionServer, client: httpx.Client) -> None:
    for i, password in enumerate(["Ab1!xxxqz", "Ab1!" + "xy" * 34]):  # 3 in a row; 72 characters
        assert (
            new_affiliate(client, refersion, password=password, email=f"p{i}@example.com").status_code == 200
        )


@pytest.mark.parametrize(("field", "value"), [("status", "DENIED"), ("country", "GBR"), ("country", "1A")])
def test_refersion_invalid_field_is_204(
    refersion: RefersionServer, client: httpx.Client, field: str, value: str
) -> None:
    r = new_affiliate(client, refersion, **{field: value})
    assert r.status_code == 204
    assert not refersion.affiliates
    # The connection was closed behind the 204, so the same client still works.
    assert new_affiliate(client, refersion).status_code == 200


def test_refersion_204_carries_a_body_on_the_wire(refersion: RefersionServer) -> None:
    body = json.dumps({**AFFILIATE, "country": "Britain"}).encode()
    head = (
        "POST /v2/affiliate/new HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Refersion-Public-Key: pub\r\nRefersion-Secret-Key: sec\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(refersion.url.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 204")
    assert b"Content-Length: %d" % len(payload) in head_bytes
    assert json.loads(payload) == {"errors": ["Invalid country"]}


def test_refersion_email_taken(refersion: RefersionServer, client: httpx.Client) -> None:
    existing = refersion.add_affiliate("ADA@example.com", first_name="Ada")
    r = new_affiliate(client, refersion)
    assert r.status_code == 422
    assert r.json() == {"errors": ["The email you have entered is taken by another Affiliate."]}
    assert list(refersion.affiliates) == [existing]
    assert not refersion.accepted


def test_refersion_status_change(refersion: RefersionServer, client: httpx.Client) -> None:
    a, b, stuck = (refersion.add_affiliate(f"{n}@example.com") for n in "abc")
    refersion.not_changeable.add(stuck)
    r = status_change(client, refersion, {"ids": [a, "zzzz", stuck, b], "status": "DISABLED"})
    assert r.status_code == 200
    assert r.json() == {"ids_changed": [a, b], "ids_not_changed": ["zzzz", stuck]}
    assert [refersion.affiliates[i]["status"] for i in (a, b, stuck)] == ["DISABLED", "DISABLED", "ACTIVE"]
    assert refersion.accepted == {(a, "DISABLED"): 1, (b, "DISABLED"): 1}


@pytest.mark.parametrize(
    "body",
    [
        {"ids": [f"a{i}" for i in range(51)], "status": "DISABLED"},
        {"ids": ["a1"], "status": "PENDING"},
        {"ids": ["a1"]},
        {"status": "ACTIVE"},
    ],
)
def test_refersion_status_change_rejected(
    refersion: RefersionServer, client: httpx.Client, body: Any
) -> None:
    r = status_change(client, refersion, body)
    assert r.status_code == 400
    assert "error" in r.json()


def test_refersion_status_change_fifty_ids_allowed(refersion: RefersionServer, client: httpx.Client) -> None:
    r = status_change(client, refersion, {"ids": [f"x{i}" for i in range(50)], "status": "ACTIVE"})
    assert r.status_code == 200
    assert len(r.json()["ids_not_changed"]) == 50


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v2/affiliate/delete"), ("POST", "/affiliate/new"), ("GET", "/v2/affiliate/new")],
)
def test_refersion_unknown_path(
    refersion: RefersionServer, client: httpx.Client, method: str, path: str
) -> None:
    r = client.request(method, refersion.url + path, json=AFFILIATE, headers=KEYS)
    assert (r.status_code, r.content) == (404, b"")
    assert not refersion.affiliates


# Segment


def test_segment_accepts_message(segment: SegmentServer, client: httpx.Client) -> None:
    headers = segment_headers(settings={"network_id": "7"})
    r = client.post(segment.url + "/v1/identify", json=MESSAGE, headers=headers)
    assert r.status_code == 200
    assert r.json() == {"ok": True}
    assert segment.messages == [MESSAGE]
    assert segment.accepted == {("u1", "m1"): 1}
    [rec] = segment.requests
    assert (rec.path, rec.json, rec.settings) == ("/v1/identify", MESSAGE, {"network_id": "7"})


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic " + base64.b64encode(b"other:").decode(),
        "Basic " + base64.b64encode(b"k3y").decode(),
        "Bearer k3y",
        "Basic %%%",
    ],
)
def test_segment_bad_credentials(
    segment: SegmentServer, client: httpx.Client, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    r = client.post(segment.url + "/", json=MESSAGE, headers=headers)
    assert r.status_code == 401
    assert "error" in r.json()
    assert not segment.messages


def test_segment_requires_json_content_type(segment: SegmentServer, client: httpx.Client) -> None:
    headers = {**segment_headers(), "Content-Type": "text/plain"}
    r = client.post(segment.url + "/", content=json.dumps(MESSAGE), headers=headers)
    assert r.status_code == 415
    assert not segment.messages


@pytest.mark.parametrize(
    "body", [[MESSAGE], {"type": "identify", "userId": "u1"}, {"messageId": "m1", "userId": "u1"}, "nope"]
)
def test_segment_rejects_bad_body(segment: SegmentServer, client: httpx.Client, body: Any) -> None:
    r = client.post(segment.url + "/", json=body, headers=segment_headers())
    assert r.status_code == 400
    assert not segment.messages


@pytest.mark.parametrize(
    "settings", ["%%%", base64.b64encode(b"not json").decode(), base64.b64encode(b"[1]").decode()]
)
def test_segment_rejects_bad_settings(segment: SegmentServer, client: httpx.Client, settings: str) -> None:
    r = client.post(
        segment.url + "/", json=MESSAGE, headers={**segment_headers(), "X-Segment-Settings": settings}
    )
    assert r.status_code == 400
    assert not segment.messages


# Behaviour shared by every server


def test_fault_answers_then_normal_handling(segment: SegmentServer, client: httpx.Client) -> None:
    segment.fault(500, '{"error": "boom"}', times=2)
    segment.fault(408, "slow down", headers={"X-Why": "test"})
    first, second, third, fourth = (
        client.post(segment.url + "/", json=MESSAGE, headers=segment_headers()) for _ in range(4)
    )
    assert [r.status_code for r in (first, second, third, fourth)] == [500, 500, 408, 200]
    assert first.json() == {"error": "boom"}
    assert first.headers["content-type"] == "application/json"
    assert (third.text, third.headers["x-why"], third.headers["content-type"]) == (
        "slow down",
        "test",
        "text/plain",
    )
    assert len(segment.requests) == 4
    assert segment.accepted == {("u1", "m1"): 1}


def test_fault_delay_and_server_delay(everflow: EverflowServer) -> None:
    everflow.fault(200, "late", delay=2)
    with httpx.Client(timeout=0.2) as short:
        with pytest.raises(httpx.ReadTimeout):
            postback(short, everflow, nid="7", transaction_id="t1")
        everflow.delay = 2
        with pytest.raises(httpx.ReadTimeout):
            postback(short, everflow, nid="7", transaction_id="t1")


def test_reset_connection(everflow: EverflowServer, client: httpx.Client) -> None:
    assert postback(client, everflow, nid="7", transaction_id="t0").is_success  # a kept-alive connection
    everflow.reset_connection(times=2)
    for _ in range(2):
        with pytest.raises(httpx.ReadError):
            postback(client, everflow, nid="7", transaction_id="t1")
    assert postback(client, everflow, nid="7", transaction_id="t1").is_success
    assert len(everflow.requests) == 4
    assert everflow.accepted == {("t0", ""): 1, ("t1", ""): 1}


def test_accept_then_reset_or_answer_late(everflow: EverflowServer, client: httpx.Client) -> None:
    everflow.accept_then(times=1)
    with pytest.raises(httpx.ReadError):
        postback(client, everflow, nid="7", transaction_id="t1")
    everflow.accept_then(times=1, answer_after=2)
    with httpx.Client(timeout=0.2) as short, pytest.raises(httpx.ReadTimeout):
        postback(short, everflow, nid="7", transaction_id="t2")
    assert postback(client, everflow, nid="7", transaction_id="t3").is_success
    assert everflow.accepted == {("t1", ""): 1, ("t2", ""): 1, ("t3", ""): 1}  # the client saw only t3's
    assert everflow.unanswered == 2


def test_rate_limit(client: httpx.Client) -> None:
    with EverflowServer(rate_limit=2) as server:
        responses = [postback(client, server, nid="1", transaction_id=f"t{i}") for i in range(5)]
        assert [r.status_code for r in responses] == [200, 200, 429, 429, 429]  # burst of 2
        assert all(r.headers["retry-after"] == "1" for r in responses[2:])
        assert server.throttled == 3
        assert sum(server.accepted.values()) == 2
        time.sleep(1)  # refills two tokens
        assert postback(client, server, nid="1", transaction_id="t9").status_code == 200
        server.rate_limit = None
        assert all(postback(client, server, nid="1", transaction_id="t").is_success for _ in range(5))


def test_fail_ratio_is_seeded(client: httpx.Client) -> None:
    def statuses(ratio: float) -> list[int]:
        with EverflowServer(fail_ratio=ratio) as server:
            return [postback(client, server, nid="1", transaction_id=f"t{i}").status_code for i in range(40)]

    half = statuses(0.5)
    assert set(half) == {200, 503}
    assert half == statuses(0.5)
    assert set(statuses(1.0)) == {503}


def test_concurrent_requests_are_all_counted(refersion: RefersionServer, client: httpx.Client) -> None:
    ids = [refersion.add_affiliate(f"{i}@example.com") for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: status_change(client, refersion, {"ids": [i], "status": "DENIED"}), ids * 3))
    assert refersion.accepted == {(i, "DENIED"): 3 for i in ids}
    assert len(refersion.requests) == 120


def test_close_ends_kept_alive_connections_and_sleeping_handlers() -> None:
    threads_before = set(threading.enumerate())
    server = EverflowServer()
    with httpx.Client(timeout=5) as idle, httpx.Client(timeout=0.2) as waiting:
        assert postback(
            idle, server, nid="1", transaction_id="t1"
        ).is_success  # leaves a kept-alive connection
        server.delay = 30
        with pytest.raises(httpx.ReadTimeout):
            postback(waiting, server, nid="1", transaction_id="t2")
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 10
        # the serving thread and both handlers were joined (threads of earlier tests may end meanwhile)
        assert not set(threading.enumerate()) - threads_before
        with pytest.raises(httpx.TransportError):
            postback(idle, server, nid="1", transaction_id="t3")
    server.close()  # idempotent
