"""Refersion: audience members become affiliates through REST API v2."""

import secrets
import string
from collections.abc import Callable
from typing import Any

import httpx
import sqlalchemy as sa

from sync.destinations import Call, Destination, Outcome, accepted, base_url, error_text, rejected
from sync.errors import ConfigError, FatalError
from sync.messages import Change

STATUS_CHANGE_MAX_IDS = 50
SYMBOLS = "!#$%&*+-=?@^_~"


def generate_password() -> str:
    """A password meeting Refersion's rules: 9-72 chars with upper, lower, digit and symbol, no 4-in-a-row."""
    classes = [string.ascii_uppercase, string.ascii_lowercase, string.digits, SYMBOLS]
    alphabet = "".join(classes)
    while True:
        chars = [secrets.choice(c) for c in classes] + [secrets.choice(alphabet) for _ in range(16)]
        secrets.SystemRandom().shuffle(chars)
        password = "".join(chars)
        if not any(password[i] == password[i + 1] == password[i + 2] == password[i + 3] for i in range(17)):
            return password


def split_name(traits: dict[str, Any]) -> tuple[str, str]:
    """First and last name (snake or camel case), or `name` split on its last space."""
    first = traits.get("first_name") or traits.get("firstName") or ""
    last = traits.get("last_name") or traits.get("lastName") or ""
    if not (first and last) and traits.get("name"):
        head, _, tail = str(traits["name"]).strip().rpartition(" ")
        first, last = first or head, last or tail
    return str(first).strip(), str(last).strip()


class Refersion(Destination):
    kind = "refersion"
    settings_fields = frozenset({"api_base", "status", "offer", "send_welcome", "on_exit"})
    default_rate_limit = 5.0

    def __init__(self, row: sa.Row[Any], settings: dict[str, Any], api_key: str | None) -> None:
        super().__init__(row, settings, api_key)
        self.on_exit = settings.get("on_exit", "ignore")
        if self.on_exit not in ("ignore", "disable"):
            raise ConfigError(
                f"{self.where}: settings.on_exit must be 'ignore' or 'disable', not {self.on_exit!r}"
            )
        self.status = settings.get("status", "PENDING")
        if self.status not in ("ACTIVE", "PENDING"):
            raise ConfigError(
                f"{self.where}: settings.status must be 'ACTIVE' or 'PENDING', not {self.status!r}"
            )
        if self.transport is not None:
            return
        self.api_base = base_url(
            settings.get("api_base", "https://api.refersion.com/v2"), f"{self.where}: settings.api_base"
        )
        public, _, secret = (api_key or "").partition(".")
        if not public or not secret or not (public + secret).isascii() or not (public + secret).isprintable():
            raise ConfigError(
                f"{self.where}: the Refersion API key must be 'publickey.secretkey' "
                + (
                    "(none is set: fill api_key or api_key_env)"
                    if not api_key
                    else "(the key given is not two non-empty parts of plain ASCII around a '.')"
                )
            )
        self.headers = {"Refersion-Public-Key": public, "Refersion-Secret-Key": secret}

    def check(self, change: Change, message: dict[str, Any]) -> str | None:
        if not change.value or (change.remote_id and self.transport is None):
            return None
        first, last = split_name(change.traits)
        missing = [
            name
            for name, value in (
                ("email", change.traits.get("email")),
                ("first_name", first),
                ("last_name", last),
            )
            if not value
        ]
        if missing:
            return f"Refersion needs {', '.join(missing)} to create an affiliate"
        return None

    def plan_native(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        done: list[Outcome] = []
        calls: list[Call] = []
        reactivate: list[Change] = []
        disable: list[Change] = []
        for change in changes:
            if change.value and change.remote_id is None:
                calls.append(self._new_affiliate(change))
            elif change.value:
                (done.append(accepted(change)) if change.remote_active else reactivate.append(change))
            elif self.on_exit == "ignore":
                done.append(accepted(change))
            elif change.remote_id is None:
                done.append(
                    rejected(
                        change,
                        "no Refersion affiliate id is known for this user (it already was an "
                        "affiliate when it entered), so it cannot be disabled",
                    )
                )
            else:
                disable.append(change)
        calls += self._status_changes(reactivate, "ACTIVE") + self._status_changes(disable, "DISABLED")
        return done, calls

    def forget_native(self, change: Change) -> Call | None:
        """Refersion has no delete endpoint: the affiliate is disabled."""
        return self._status_changes([change], "DISABLED")[0] if change.remote_id else None

    def _new_affiliate(self, change: Change) -> Call:
        traits = change.traits
        first, last = split_name(traits)
        body: dict[str, Any] = {
            "first_name": first,
            "last_name": last,
            "email": traits.get("email"),
            "password": generate_password(),
            "status": self.status,
            "send_welcome": "TRUE"
            if self.settings.get("send_welcome") in (True, "TRUE", "true")
            else "FALSE",
            "unique_merchant_id": change.user_id,
        }
        if self.settings.get("offer"):
            body["offer"] = self.settings["offer"]
        address = {
            "address1": traits.get("street") or traits.get("address1"),
            "city": traits.get("city"),
            "state": traits.get("state"),
            "zip": traits.get("postal_code") or traits.get("zip"),
            "country": traits.get("country"),
            "phone": traits.get("phone"),
        }
        body.update({k: str(v) for k, v in address.items() if v not in (None, "")})
        return Call(
            [change],
            "POST",
            f"{self.api_base}/affiliate/new",
            _read_new,
            json=body,
            headers=self.headers,
            masked=("password",),
        )

    def _status_changes(self, changes: list[Change], status: str) -> list[Call]:
        return [
            Call(
                batch,
                "POST",
                f"{self.api_base}/affiliate/status_change",
                _read_status_change,
                json={"ids": [c.remote_id for c in batch], "status": status},
                headers=self.headers,
            )
            for batch in (
                changes[i : i + STATUS_CHANGE_MAX_IDS] for i in range(0, len(changes), STATUS_CHANGE_MAX_IDS)
            )
        ]

    def secrets(self) -> list[str]:
        return super().secrets() + [v for v in getattr(self, "headers", {}).values()]


def _read_new(call: Call, response: httpx.Response) -> list[Outcome]:
    change = call.changes[0]
    if response.status_code == 204:  # Refersion's way of saying a field is invalid; its body is not reliable
        return [rejected(change, "Refersion answered 204: a field of the affiliate is invalid")]
    if response.status_code == 422 and "taken" in response.text:
        return [accepted(change, reason="already an affiliate (email taken)")]
    if not response.is_success:
        raise FatalError(error_text(response), response.status_code)
    try:
        remote_id = response.json().get("id")
    except (ValueError, AttributeError):
        remote_id = None
    # without the id the affiliate could never be disabled: not accepted, sent again next run
    if not remote_id or not isinstance(remote_id, str | int):
        return [
            Outcome(change, "failed", f"Refersion answered {response.status_code} without an affiliate id")
        ]
    return [accepted(change, remote_id=str(remote_id), remote_active=True)]


def _read_status_change(call: Call, response: httpx.Response) -> list[Outcome]:

    if not response.is_success:
        raise FatalError(error_text(response), response.status_code)
    try:
        body = response.json()
        ids = body.get("ids_changed")
    except (ValueError, AttributeError):  # not JSON, not an object
        ids = None
    changed = {str(i) for i in ids} if isinstance(ids, list) else set()
    active = call.json["status"] == "ACTIVE"
    return [
        accepted(c, remote_active=active)
        if c.remote_id in changed
        else Outcome(c, "failed", "Refersion did not change this affiliate's status (ids_not_changed)")
        for c in call.changes
    ]
