"""Proving a destination's credentials with one harmless call (`check --connect`), against the sandbox."""

import httpx
import pytest

from sync.delivery import Sender
from sync.destinations.http import Call
from sync.errors import AuthError, FatalError
from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from tests.test_destinations import everflow, refersion, segment


def prove(call: Call | str, server: RefersionServer) -> str:
    assert isinstance(call, Call), call
    sender = Sender(refersion(server))  # the probe carries its own headers: any Refersion sender sends it
    try:
        return sender.prove(call)
    finally:
        sender.close()


def test_refersion_probe_with_the_right_key_says_credentials_accepted_and_changes_nothing() -> None:
    with RefersionServer(public_key="pub", secret_key="sec") as server:
        server.add_affiliate("ada@example.com", first_name="Ada", last_name="Lovelace")
        before = {n: dict(a) for n, a in server.affiliates.items()}
        assert prove(refersion(server, api_key="pub.sec").probe(), server) == "credentials accepted"
        [request] = server.requests
        assert (request.method, request.path) == ("POST", "/v2/affiliate/search")
        assert server.affiliates == before
        # the keyword matches no affiliate: a search, not a look at anyone's data
        keys = {"Refersion-Public-Key": "pub", "Refersion-Secret-Key": "sec"}
        found = httpx.post(server.url + request.path, json=request.json, headers=keys)
        # the reference's answer to a search that finds nothing (/affiliate/search 422 example)
        assert (found.status_code, found.json()) == (
            422,
            {"errors": ["Could not find affiliates with this keyword."]},
        )


@pytest.mark.parametrize("api_key", ["pub.wrong", "wrong.sec"])
def test_refersion_probe_with_a_wrong_key_is_refused_with_the_destinations_reason(api_key: str) -> None:
    with RefersionServer(public_key="pub", secret_key="sec") as server:
        with pytest.raises(AuthError) as refused:
            prove(refersion(server, api_key=api_key).probe(), server)
        assert refused.value.reason == "credentials refused (HTTP 401: Invalid API credentials (error 2).)"
        assert refused.value.status == 401
        assert len(server.requests) == 1  # a refusal is not retried


def test_refersion_probe_at_a_wrong_path_says_the_credentials_could_not_be_checked() -> None:
    with RefersionServer() as server:
        dest = refersion(server, api_base=server.url + "/v1")
        with pytest.raises(FatalError) as unchecked:
            prove(dest.probe(), server)
        assert not isinstance(unchecked.value, AuthError)
        assert unchecked.value.reason == "the credentials could not be checked: HTTP 404"


def test_everflow_and_the_segment_transport_say_why_they_cannot_be_proved() -> None:
    with EverflowServer() as postbacks, SegmentServer(kind="refersion") as partner:
        assert everflow(postbacks).probe() == (
            "Everflow postbacks carry no credential a call could prove: a postback is answered 200 whatever "
            "its network id and verification token, which Everflow checks only in its own reports"
        )
        for dest in (segment(partner, kind="everflow"), segment(partner, kind="refersion")):
            said = dest.probe()
            assert isinstance(said, str)
            assert said.startswith("the Segment transport cannot be checked without sending a message")
        assert postbacks.requests == [] and partner.requests == []
