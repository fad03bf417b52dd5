"""The fake destination servers, driven over real HTTP and in process (the same emulation as an
`httpx.MockTransport` handler): the tests taking `client` run both ways."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from sync import sandbox
from sync.sandbox import EverflowServer, RefersionServer, SegmentServer

KEYS = {"Refersion-Public-Key": "pub", "Refersion-Secret-Key": "sec"}
AFFILIATE = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada@example.com",
    "password": "Xy7!kq2Lm",
    "status": "PENDING",
    "unique_merchant_id": "u1",
}
REFERSION_PATHS = [
    "/v2/affiliate/new",
    "/v2/affiliate/get",
    "/v2/affiliate/search",
    "/v2/affiliate/status_change",
]


@pytest.fixture(params=["loopback", "in process"])
def client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """A client of the servers the test takes as fixtures, over loopback or in process."""
    transport = None
    if request.param == "in process":
        names = [name for name in ("everflow", "refersion", "segment") if name in request.fixturenames]
        transport = sandbox.transport(*[request.getfixturevalue(name) for name in names])
    with httpx.Client(timeout=5, transport=transport) as c:
        yield c


@pytest.fixture
def wire() -> Iterator[httpx.Client]:
    """A client over loopback only: for servers a test starts itself."""
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


def refersion_call(client: httpx.Client, server: RefersionServer, call: str, body: Any) -> httpx.Response:
    return client.post(f"{server.url}/v2/affiliate/{call}", json=body, headers=KEYS)


def status_change(client: httpx.Client, server: RefersionServer, body: Any) -> httpx.Response:
    return refersion_call(client, server, "status_change", body)


def raw_post(server: RefersionServer, path: str, body: Any) -> tuple[bytes, bytes]:
    """POST over a bare socket and read to EOF: the head and the body, even the body of a 204."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Refersion-Public-Key: pub\r\nRefersion-Secret-Key: sec\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(head.encode() + data)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    return head_bytes, payload


def segment_headers(api_key: str = "k3y", settings: Any = None) -> dict[str, str]:
    headers = {"Authorization": "Basic " + base64.b64encode(f"{api_key}:".encode()).decode()}
    if settings is not None:
        headers["X-Segment-Settings"] = base64.b64encode(json.dumps(settings).encode()).decode()
    return headers


MESSAGE = {"type": "identify", "userId": "u1", "messageId": "m1", "traits": {"vip": True}}
TRACK = {
    "type": "track",
    "event": "Audience Entered",
    "userId": "u1",
    "messageId": "m2",
    "context": {"referrer": {"type": "everflow", "id": "tid-1"}},
}


# Everflow


def test_everflow_postback_accepted_and_recorded(everflow: EverflowServer, client: httpx.Client) -> None:
    r = postback(client, everflow, nid="7", transaction_id="t1", adv_event_id="3", aid="9", amount="1.5")
    assert (r.status_code, r.text) == (200, "OK")
    assert everflow.accepted == {("t1", "3"): 1}
    assert everflow.conversions == {("t1", "3"): 1}
    assert everflow.report == []
    [rec] = everflow.requests
    assert (rec.method, rec.path, rec.json) == ("GET", "/", None)
    assert rec.query == {"nid": "7", "transaction_id": "t1", "adv_event_id": "3", "aid": "9", "amount": "1.5"}
    assert rec.headers["host"] == everflow.url.removeprefix("http://")


@pytest.mark.parametrize("missing", ["nid", "transaction_id"])
def test_everflow_missing_parameter_is_200_and_reported(
    everflow: EverflowServer, client: httpx.Client, missing: str
) -> None:
    params = {"nid": "7", "transaction_id": "t1", "adv_event_id": "0"}
    del params[missing]
    r = postback(client, everflow, **params)
    assert (r.status_code, r.text) == (200, "OK")
    assert not everflow.accepted
    assert not everflow.conversions
    assert everflow.report == [(params.get("transaction_id", ""), "0", f"missing {missing}")]


def test_everflow_wrong_network_is_200_and_reported(everflow: EverflowServer, client: httpx.Client) -> None:
    r = postback(client, everflow, nid="8", transaction_id="t1", adv_event_id="0")
    assert (r.status_code, r.text) == (200, "OK")
    assert everflow.accepted == {("t1", "0"): 1}  # the endpoint received it
    assert not everflow.conversions  # Everflow records nothing
    assert everflow.report == [("t1", "0", "invalid network id")]


def test_everflow_verification_token(wire: httpx.Client) -> None:
    with EverflowServer(verification_token="tok") as server:
        for token in (None, "bad"):
            params = {"nid": "1", "transaction_id": "t1", "adv_event_id": "0"}
            if token:
                params["verification_token"] = token
            r = postback(wire, server, **params)
            assert (r.status_code, r.text) == (200, "OK")
        assert not server.conversions
        assert server.report == [("t1", "0", "invalid verification token")] * 2
        r = postback(wire, server, nid="1", transaction_id="t1", adv_event_id="0", verification_token="tok")
        assert r.status_code == 200
        assert server.accepted == {("t1", "0"): 3}
        assert server.conversions == {("t1", "0"): 1}  # the rejected ones made it no duplicate
        assert len(server.report) == 2


def test_everflow_duplicate_conversion_is_reported(everflow: EverflowServer, client: httpx.Client) -> None:
    for event in ("3", "3", "4", ""):
        assert postback(client, everflow, nid="7", transaction_id="t1", adv_event_id=event).status_code == 200
    assert postback(client, everflow, nid="7", transaction_id="t1").status_code == 200  # no adv_event_id
    assert everflow.accepted == {("t1", "3"): 2, ("t1", "4"): 1, ("t1", ""): 2}
    assert everflow.conversions == {("t1", "3"): 1, ("t1", "4"): 1, ("t1", ""): 1}
    assert everflow.report == [("t1", "3", "duplicate conversion"), ("t1", "", "duplicate conversion")]


def test_everflow_allow_duplicates(wire: httpx.Client) -> None:
    with EverflowServer(allow_duplicates=True) as server:
        for _ in range(2):
            assert postback(wire, server, nid="1", transaction_id="t1", adv_event_id="3").status_code == 200
        assert server.conversions == server.accepted == {("t1", "3"): 2}
        assert server.report == []


# Refersion


def test_refersion_new_affiliate(refersion: RefersionServer, client: httpx.Client) -> None:
    r = new_affiliate(client, refersion, country="GB", send_welcome="FALSE")
    assert r.status_code == 200
    body = r.json()
    code = body["id"]
    assert isinstance(code, str)
    assert not code.isdigit()
    [numeric] = refersion.affiliates
    assert body["message"] == f"The affiliate {numeric} has been created with the status of PENDING."
    assert body["link"] == f"{refersion.url}/c/{code}"
    stored = refersion.affiliates[numeric]
    assert (stored["id"], stored["code"]) == (numeric, code)
    assert refersion.code_of(numeric) == code
    assert refersion.by_code(code) is stored
    assert refersion.by_code("nope") is None
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
    r = new_affiliate(client, refersion, email="bob@example.com", unique_merchant_id=None, status="ACTIVE")
    assert r.status_code == 200
    assert refersion.accepted[("bob@example.com", "new")] == 1
    assert len(refersion.affiliates) == 2
    second = max(refersion.affiliates)
    assert second > numeric
    assert r.json()["id"] == refersion.code_of(second) != code
    assert r.json()["message"] == f"The affiliate {second} has been created with the status of ACTIVE."


def test_refersion_add_affiliate(refersion: RefersionServer) -> None:
    a = refersion.add_affiliate("a@example.com", first_name="A")
    b = refersion.add_affiliate("b@example.com", status="DISABLED", password="secret")
    assert isinstance(a, int)
    assert b > a
    assert refersion.affiliates[a] == {
        "id": a,
        "code": refersion.code_of(a),
        "email": "a@example.com",
        "status": "ACTIVE",
        "first_name": "A",
    }
    assert refersion.affiliates[b]["status"] == "DISABLED"
    assert "password" not in refersion.affiliates[b]
    assert re.fullmatch(r"[a-z][0-9a-z]*", refersion.code_of(b))
    assert not refersion.accepted


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


@pytest.mark.parametrize("path", REFERSION_PATHS)
@pytest.mark.parametrize("content", [b"", b"nope", b"[1]", b'"x"', b"null"])
def test_refersion_no_body_is_404(
    refersion: RefersionServer, client: httpx.Client, path: str, content: bytes
) -> None:
    headers = {**KEYS, "Content-Type": "application/json"}
    r = client.post(refersion.url + path, content=content, headers=headers)
    assert r.status_code == 404
    assert r.json() == {"error": "Bad request, no body"}
    assert not refersion.affiliates


@pytest.mark.parametrize("field", ["first_name", "last_name", "email", "password", "status"])
def test_refersion_missing_field(refersion: RefersionServer, client: httpx.Client, field: str) -> None:
    r = new_affiliate(client, refersion, **{field: None})
    assert r.status_code == 400
    assert r.json() == {"error": f"Missing required field {field}"}
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


@pytest.mark.parametrize(
    ("field", "value"),
    [("status", "DENIED")],
)
def test_refersion_invalid_field_is_204(
    refersion: RefersionServer, client: httpx.Client, field: str, value: str
) -> None:
    r = new_affiliate(client, refersion, **{field: value})
    assert (r.status_code, r.content) == (204, b"")  # a client reads no body on 204
    assert not refersion.affiliates
    # The connection was closed behind the 204, so the same client still works.
    assert new_affiliate(client, refersion).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "errors"),
    [
        ("/v2/affiliate/new", {**AFFILIATE, "status": "DISABLED"}, ["Invalid status"]),
        ("/v2/affiliate/status_change", {"ids": [1], "status": "PENDING"}, ["Invalid status"]),
        ("/v2/affiliate/search", {"keyword": "a", "page": "0"}, ["Invalid page"]),
    ],
)
def test_refersion_204_carries_a_body_on_the_wire(
    refersion: RefersionServer, path: str, body: Any, errors: list[str]
) -> None:
    head, payload = raw_post(refersion, path, body)
    assert head.startswith(b"HTTP/1.1 204")
    assert b"Content-Length: %d" % len(payload) in head
    assert b"Connection: close" in head
    assert json.loads(payload) == {"errors": errors}
    assert not refersion.affiliates


def test_refersion_email_taken(refersion: RefersionServer, client: httpx.Client) -> None:
    existing = refersion.add_affiliate("ADA@example.com", first_name="Ada")
    r = new_affiliate(client, refersion)
    assert r.status_code == 422
    assert r.json() == {"errors": ["The email you have entered is taken by another Affiliate."]}
    assert list(refersion.affiliates) == [existing]
    assert not refersion.accepted


def test_refersion_get_by_code_and_by_id(refersion: RefersionServer, client: httpx.Client) -> None:
    refersion.add_affiliate("other@example.com")
    created = new_affiliate(client, refersion, offer="777", company="Engines").json()
    numeric = max(refersion.affiliates)
    expected = {
        "id": numeric,
        "offer_id": "777",
        "status": "PENDING",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "company_name": "Engines",
        "email": "ada@example.com",
        "link": created["link"],
        "custom_fields": [],
    }
    by_code = refersion_call(client, refersion, "get", {"affiliate_code": created["id"]})
    by_id = refersion_call(client, refersion, "get", {"id": numeric})
    assert (by_code.status_code, by_id.status_code) == (200, 200)
    assert by_code.json() == by_id.json() == expected
    # Without an offer, the default offer; without names, empty strings.
    other = refersion_call(client, refersion, "get", {"id": min(refersion.affiliates)}).json()
    assert (other["offer_id"], other["first_name"], other["status"]) == ("1234", "", "ACTIVE")


@pytest.mark.parametrize(
    "body", [{"affiliate_code": "zzzz"}, {"id": 1}, {"id": "37569297"}, {"id": True}, {"affiliate_code": ""}]
)
def test_refersion_get_unknown_is_422(refersion: RefersionServer, client: httpx.Client, body: Any) -> None:
    refersion.add_affiliate("a@example.com")  # numeric id 37569297, the first one
    assert 37569297 in refersion.affiliates
    r = refersion_call(client, refersion, "get", body)
    assert r.status_code == 422
    assert r.json() == {"errors": ["Affiliate not found"]}


@pytest.mark.parametrize("body", [{}, {"code": "c1"}, {"id": None, "affiliate_code": None}])
def test_refersion_get_without_id_or_code(
    refersion: RefersionServer, client: httpx.Client, body: Any
) -> None:
    r = refersion_call(client, refersion, "get", body)
    assert r.status_code == 400
    assert r.json() == {"error": "Missing required field id or affiliate_code"}


def test_refersion_search_exact_code_and_partial_email(
    refersion: RefersionServer, client: httpx.Client
) -> None:
    ada = refersion.add_affiliate("Ada@Example.com", first_name="Ada", last_name="L", offer="9")
    bob = refersion.add_affiliate("bob@example.org")
    refersion.add_affiliate("eve@elsewhere.net")
    code = refersion.code_of(ada)

    def search(keyword: str) -> Any:
        r = refersion_call(client, refersion, "search", {"keyword": keyword})
        assert r.status_code in (200, 422)
        return r.json()

    assert search(code) == {
        "total": 1,
        "results": [
            {
                "id": code,
                "offer_id": "9",
                "status": "ACTIVE",
                "first_name": "Ada",
                "last_name": "L",
                "email": "Ada@Example.com",
                "custom_fields": [],
            }
        ],
    }
    # a code matches only exactly; nothing found is 422 (the reference's example for this endpoint)
    assert search(code[:-1]) == {"errors": ["Could not find affiliates with this keyword."]}
    found = search("EXAMPLE")  # a partial email, any case
    assert found["total"] == 2
    assert [r["id"] for r in found["results"]] == [code, refersion.code_of(bob)]
    # the numeric id is not a keyword
    assert search(str(ada)) == {"errors": ["Could not find affiliates with this keyword."]}


def test_refersion_search_pages_until_total(refersion: RefersionServer, client: httpx.Client) -> None:
    refersion.search_page_size = 3
    ids = [refersion.add_affiliate(f"user{i}@example.com") for i in range(8)]
    refersion.add_affiliate("other@elsewhere.net")
    codes, page = [], 1
    while True:
        body = {"keyword": "@example.com"} if page == 1 else {"keyword": "@example.com", "page": str(page)}
        r = refersion_call(client, refersion, "search", body)
        assert r.status_code == 200
        results = r.json()["results"]
        assert r.json()["total"] == 8
        assert len(results) <= 3
        codes += [result["id"] for result in results]
        if len(codes) >= r.json()["total"]:
            break
        page += 1
    assert page == 3
    assert codes == [refersion.code_of(i) for i in ids]  # ordered by numeric id
    past = refersion_call(client, refersion, "search", {"keyword": "@example.com", "page": 4})
    assert past.json() == {"total": 8, "results": []}


@pytest.mark.parametrize("body", [{}, {"keyword": ""}, {"keyword": None}, {"page": "1"}])
def test_refersion_search_needs_keyword(refersion: RefersionServer, client: httpx.Client, body: Any) -> None:
    r = refersion_call(client, refersion, "search", body)
    assert r.status_code == 400
    assert r.json() == {"error": "Missing required field keyword"}


@pytest.mark.parametrize("page", ["0", "x", -1, True, 1.5, None])
def test_refersion_search_invalid_page_is_204(
    refersion: RefersionServer, client: httpx.Client, page: Any
) -> None:
    r = refersion_call(client, refersion, "search", {"keyword": "a", "page": page})
    assert r.status_code == 204


def test_refersion_status_change(refersion: RefersionServer, client: httpx.Client) -> None:
    a, b, stuck = (refersion.add_affiliate(f"{n}@example.com") for n in "abc")
    refersion.not_changeable.add(stuck)
    r = status_change(client, refersion, {"ids": [a, 1, stuck, b], "status": "DISABLED"})
    assert r.status_code == 200
    assert r.json() == {"ids_changed": [a, b], "ids_not_changed": [1, stuck]}
    statuses = [refersion.affiliates[i]["status"] for i in (a, b, stuck)]
    assert statuses == ["DISABLED", "DISABLED", "ACTIVE"]
    assert refersion.accepted == {(a, "DISABLED"): 1, (b, "DISABLED"): 1}


def test_refersion_status_change_takes_integer_ids_only(
    refersion: RefersionServer, client: httpx.Client
) -> None:
    # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): ids is an array of integers; an
    # invalid field is a 204
    created = new_affiliate(client, refersion).json()
    numeric = next(iter(refersion.affiliates))
    for ids in ([created["id"]], [str(numeric)], [True], [None], [numeric, str(numeric)]):
        r = status_change(client, refersion, {"ids": ids, "status": "DENIED"})
        assert (r.status_code, r.content) == (204, b""), ids
    stored = refersion.by_code(created["id"])
    assert stored is not None
    assert stored["status"] == "PENDING"
    assert not [key for key in refersion.accepted if key[1] != "new"]  # no status changed


@pytest.mark.parametrize("status", ["PENDING", "active", "DELETED", 1])
def test_refersion_status_change_invalid_status_is_204(
    refersion: RefersionServer, client: httpx.Client, status: Any
) -> None:
    a = refersion.add_affiliate("a@example.com", status="DENIED")
    r = status_change(client, refersion, {"ids": [a], "status": status})
    assert r.status_code == 204
    assert refersion.affiliates[a]["status"] == "DENIED"
    assert not refersion.accepted


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"ids": list(range(51)), "status": "DISABLED"}, "A maximum of 50 ids is allowed"),
        ({"ids": [1]}, "Missing required field status"),
        ({"status": "ACTIVE"}, "Missing required field ids"),
        ({"ids": 1, "status": "ACTIVE"}, "Missing required field ids"),
    ],
)
def test_refersion_status_change_rejected(
    refersion: RefersionServer, client: httpx.Client, body: Any, error: str
) -> None:
    r = status_change(client, refersion, body)
    assert r.status_code == 400
    assert r.json() == {"error": error}


def test_refersion_status_change_fifty_ids_allowed(refersion: RefersionServer, client: httpx.Client) -> None:
    r = status_change(client, refersion, {"ids": list(range(50)), "status": "ACTIVE"})
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


def test_segment_generic_kind_accepts_any_type(segment: SegmentServer, client: httpx.Client) -> None:
    assert segment.kind is None
    for i, kind in enumerate(["track", "page", "group", "alias", "screen", "delete"]):
        message = {"type": kind, "userId": "u1", "messageId": f"m{i}"}
        assert client.post(segment.url + "/", json=message, headers=segment_headers()).status_code == 200
    assert len(segment.messages) == 6


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
    assert r.json() == {"message": "Invalid API key"}
    assert not segment.messages


def test_segment_requires_json_content_type(segment: SegmentServer, client: httpx.Client) -> None:
    headers = {**segment_headers(), "Content-Type": "text/plain"}
    r = client.post(segment.url + "/", content=json.dumps(MESSAGE), headers=headers)
    assert r.status_code == 415
    assert set(r.json()) == {"message"}
    assert not segment.messages


@pytest.mark.parametrize(
    "body", [[MESSAGE], {"type": "identify", "userId": "u1"}, {"messageId": "m1", "userId": "u1"}, "nope"]
)
def test_segment_rejects_bad_body(segment: SegmentServer, client: httpx.Client, body: Any) -> None:
    r = client.post(segment.url + "/", json=body, headers=segment_headers())
    assert r.status_code == 400
    assert set(r.json()) == {"message"}
    assert not segment.messages


@pytest.mark.parametrize(
    "settings", ["%%%", base64.b64encode(b"not json").decode(), base64.b64encode(b"[1]").decode()]
)
def test_segment_rejects_bad_settings(segment: SegmentServer, client: httpx.Client, settings: str) -> None:
    r = client.post(
        segment.url + "/", json=MESSAGE, headers={**segment_headers(), "X-Segment-Settings": settings}
    )
    assert r.status_code == 400
    assert set(r.json()) == {"message"}
    assert not segment.messages


def test_segment_everflow_kind_takes_track_with_referrer(wire: httpx.Client) -> None:
    settings = {"apiKey": "k3y", "eventMapping": {"Audience Entered": "7"}}
    with SegmentServer(api_key="k3y", kind="everflow") as server:
        r = wire.post(server.url + "/", json=MESSAGE, headers=segment_headers(settings=settings))
        assert r.status_code == 501
        assert r.json() == {"message": "Unsupported call type identify"}
        r = wire.post(server.url + "/", json=TRACK, headers=segment_headers(settings=settings))
        assert r.status_code == 200
        assert server.messages == [TRACK]
        assert server.accepted == {("u1", "m2"): 1}
        assert server.postbacks == [{"transaction_id": "tid-1", "adv_event_id": "7"}]


@pytest.mark.parametrize(
    "context",
    [
        None,
        [],
        {},
        {"referrer": {"id": "tid-1"}},
        {"referrer": {"type": "other", "id": "tid-1"}},
        {"referrer": {"type": "everflow"}},
        {"referrer": {"type": "everflow", "id": ""}},
        {"referrer": "tid-1"},
    ],
)
def test_segment_everflow_kind_requires_referrer(wire: httpx.Client, context: Any) -> None:
    track = {k: v for k, v in TRACK.items() if k != "context"}
    if context is not None:
        track["context"] = context
    with SegmentServer(api_key="k3y", kind="everflow") as server:
        r = wire.post(server.url + "/", json=track, headers=segment_headers())
        assert r.status_code == 400
        assert r.json() == {"message": "context.referrer.id and context.referrer.type are required"}
        assert not server.messages


def test_segment_refersion_kind_takes_identify_and_delete(wire: httpx.Client) -> None:
    # The delete example of Segment's Refersion destination page carries "context": [].
    delete = {"type": "delete", "userId": "5678", "messageId": "d1", "context": [], "integrations": []}
    # segment-docs, Refersion destination: an identify "must contain" a name, email and an address object
    traits = {"vip": True, "name": "Peter Gibbons", "email": "peter@example.com", "address": {}}
    identify = {**MESSAGE, "traits": traits}
    headers = segment_headers(settings={"apiKey": "k3y"})
    with SegmentServer(api_key="k3y", kind="refersion") as server:
        r = wire.post(server.url + "/", json=TRACK, headers=headers)
        assert r.status_code == 501
        assert r.json() == {"message": "Unsupported call type track"}
        for message in (identify, delete):
            assert wire.post(server.url + "/", json=message, headers=headers).status_code == 200
        assert server.messages == [identify, delete]


def test_segment_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        SegmentServer(kind="hubspot")


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
    assert [r.query["transaction_id"] for r in everflow.unanswered] == ["t1", "t2"]


def test_in_process_refuses_other_addresses_and_the_faults_that_need_a_socket(
    everflow: EverflowServer,
) -> None:
    with httpx.Client(transport=sandbox.transport(everflow)) as in_process:
        with pytest.raises(httpx.ConnectError):
            in_process.get("http://127.0.0.1:9/", params={"nid": "7", "transaction_id": "t1"})
        everflow.accept_then(times=1, answer_after=0.1)
        with pytest.raises(RuntimeError, match="EverflowServer: a late answer or a dribbled"):
            postback(in_process, everflow, nid="7", transaction_id="t2")
        everflow.fault(200, "slow", dribble=0.01)
        with pytest.raises(RuntimeError, match="needs its url"):
            postback(in_process, everflow, nid="7", transaction_id="t3")
        assert postback(in_process, everflow, nid="7", transaction_id="t4").text == "OK"
    assert [r.query["transaction_id"] for r in everflow.requests] == ["t2", "t3", "t4"]


def test_rate_limit(wire: httpx.Client) -> None:
    with EverflowServer(rate_limit=2) as server:
        responses = [postback(wire, server, nid="1", transaction_id=f"t{i}") for i in range(5)]
        assert [r.status_code for r in responses] == [200, 200, 429, 429, 429]  # burst of 2
        assert all(r.headers["retry-after"] == "1" for r in responses[2:])
        assert server.throttled == 3
        assert sum(server.accepted.values()) == 2
        time.sleep(1)  # refills two tokens
        assert postback(wire, server, nid="1", transaction_id="t9").status_code == 200
        server.rate_limit = None
        assert all(postback(wire, server, nid="1", transaction_id="t").is_success for _ in range(5))


def test_fail_ratio_is_seeded(wire: httpx.Client) -> None:
    def statuses(ratio: float) -> list[int]:
        with EverflowServer(fail_ratio=ratio) as server:
            return [postback(wire, server, nid="1", transaction_id=f"t{i}").status_code for i in range(40)]

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
