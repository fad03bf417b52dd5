"""Refersion: finding an affiliate's numeric id, by its code (/affiliate/get) or by its email
(/affiliate/search, page by page), before a status change or to adopt an affiliate that already exists."""

import dataclasses
from collections.abc import Callable
from typing import Any

import httpx

from sync.destinations.http import Call, error_text
from sync.errors import FatalError
from sync.models import Change, Outcome, failed, rejected

NO_AFFILIATE = "no Refersion affiliate is known for this user (no affiliate code and no email)"

# What a lookup leads to once it found the affiliate: the change, with its ids now known, becomes a call
# (the status change) or outcomes (an adoption, accepted as it is).
Then = Callable[[Change], "list[Outcome] | Call"]
Read = Callable[[Call, httpx.Response], "list[Outcome] | Call"]
# the POST to /affiliate/<path> with a JSON body, carrying a change
Post = Callable[[Change, str, dict[str, Any], Read], Call]


def find(post: Post, change: Change, then: Then) -> list[Outcome] | Call:
    """The lookup of the change's numeric affiliate id: by its code, else by its email."""
    if change.remote_code:
        return get(post, change, change.remote_code, then)
    email = change.traits.get("email")
    if email:
        return search(post, change, str(email), then)
    return [rejected(change, NO_AFFILIATE)]


def search(post: Post, change: Change, email: str, then: Then, page: int = 1, seen: int = 0) -> Call:
    """Page through /affiliate/search for the affiliate whose email is exactly `email` (any case)."""

    # an exit whose user has no affiliate is done: there is nothing to disable (noted as its rejection,
    # which refused nothing: it does not make the run `rejected`)
    absent = f"no Refersion affiliate has exactly the email {email!r}"
    absent += "" if change.value else ": nothing to disable"

    def not_found() -> list[Outcome]:
        return [rejected(change, absent, nothing_to_do=not change.value)]

    def read(call: Call, response: httpx.Response) -> list[Outcome] | Call:
        if no_match(response):
            return not_found()
        if response.status_code == 204 or not response.is_success:  # 204: an invalid field
            raise FatalError(
                f"searching the affiliate by email: {error_text(response)}", response.status_code
            )
        results, total = field(response, "results"), field(response, "total")
        total = int(total) if isinstance(total, str) and total.isdigit() else total
        if not isinstance(results, list):
            return [failed(change, "Refersion's search answered without results")]
        for result in results:
            if isinstance(result, dict) and str(result.get("email", "")).casefold() == email.casefold():
                return get(post, change, str(result.get("id")), then)
        if results and isinstance(total, int) and seen + len(results) < total:
            return search(post, change, email, then, page + 1, seen + len(results))
        return not_found()

    return post(change, "search", {"keyword": email, "page": str(page)}, read)


def get(post: Post, change: Change, code: str, then: Then) -> Call:
    """/affiliate/get by code: the numeric id, then `then` with the change knowing both."""

    def read(call: Call, response: httpx.Response) -> list[Outcome] | Call:
        if response.status_code == 204 or not response.is_success:  # 204: an invalid field
            raise FatalError(f"looking up affiliate {code}: {error_text(response)}", response.status_code)
        found = field(response, "id")
        if isinstance(found, bool) or not str(found).isdigit():  # not the documented answer: try again
            return [failed(change, f"Refersion's get of affiliate {code} gave no numeric id")]
        # one DISABLED or DENIED by someone else is not ours to change (adoption): its exit sends nothing
        active = field(response, "status") not in ("DISABLED", "DENIED")
        return then(dataclasses.replace(change, remote_id=str(found), remote_code=code, remote_active=active))

    return post(change, "get", {"affiliate_code": code}, read)


def no_match(response: httpx.Response) -> bool:
    """Whether this is Refersion's answer to a search that found nothing: 422 "Could not find affiliates
    with this keyword." (Refersion REST API v2 reference, OpenAPI, /affiliate/search 422 example)."""
    return response.status_code == 422 and "could not find affiliates" in response.text.casefold()


def field(response: httpx.Response, name: str) -> Any:
    """A field of a JSON object answer; None when the answer is not one."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get(name) if isinstance(body, dict) else None
