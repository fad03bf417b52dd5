"""Refersion: audience members become affiliates through REST API v2.

An affiliate has two ids: the code /affiliate/new answers with ("a3y7", kept as `remote_code`) and the
numeric id /affiliate/status_change takes (kept as `remote_id`), which /affiliate/get resolves from the
code the first time a status change needs it. A person who already is an affiliate (422, email taken) is
adopted: found with /affiliate/search by email, resolved, and recorded as ours to disable on exit
(refersion_lookup.py).
"""

import functools
import re
import secrets
import string
from collections.abc import Callable, Collection
from typing import Any

import httpx
import pycountry

from sync.destinations import refersion_lookup as lookup
from sync.destinations.base import Destination
from sync.destinations.http import Call, base_url, error_text, read_probe
from sync.errors import FatalError, Problems
from sync.models import Change, Outcome, accepted, failed, rejected

# Refersion REST API v2 reference (OpenAPI, /affiliate/status_change): "Limit of 50 IDs per call"
STATUS_CHANGE_MAX_IDS = 50
# Refersion REST API v2 reference (OpenAPI, /affiliate/new, country): "must match one of" these 90 codes;
# another is refused (422 "X is not a allowed value for field Y") with the whole create
COUNTRIES = frozenset(
    "US AE AR AS AT AU BA BD BE BG BR CA CH CL CN CO CR CZ DE DK DZ EE ES FI FM FO FR GB GH GR GU HK "
    "HN HR HU ID IE IL IM IN IS IT JM JP KR KW LT LU LV MA MH MK MP MT MX MY NG NL NO NZ OM PE PH PK "
    "PL PR PT PW QA RO RS RU SA SE SG SI SK SV TH TN TR TW TZ UA UY VG VI VN WS ZA".split()
)
# Refersion REST API v2 reference (OpenAPI, /affiliate/new 200 example): "The affiliate 37569297 has been
# created with the status of ACTIVE." The numeric id is only there.
CREATED = re.compile(r"\baffiliate (\d+) has been created\b")
# segment-docs, Refersion destination: an identify's `address` object, optionally with street, city, state,
# postalCode or postal_code and country; each filled from the first of its columns that has a value
ADDRESS = {
    "street": ("street", "address1"),
    "city": ("city",),
    "state": ("state",),
    "postal_code": ("postal_code", "postalCode", "zip"),
    "country": ("country",),
}
# REFERENCE.md (Refersion, /affiliate/search): the keyword is an exact affiliate code or part of an email;
# no code nor email holds a space, so this matches no affiliate
PROBE_KEYWORD = "audience-sync credentials check"
SYMBOLS = "!#$%&*+-=?@^_~"
KEY_FORM = "the Refersion API key must be 'publickey.secretkey'"


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
    """First and last name (snake or camel case), or `name` split at its first space."""
    first = traits.get("first_name") or traits.get("firstName") or ""
    last = traits.get("last_name") or traits.get("lastName") or ""
    if not (first and last) and traits.get("name"):
        head, _, tail = str(traits["name"]).strip().partition(" ")
        first, last = first or head, last or tail
    return str(first).strip(), str(last).strip()


def refersion_country(traits: dict[str, Any]) -> str | None:
    """The country code /affiliate/new takes for the member, None when it has none Refersion lists."""
    code = country_code(str(traits.get("country") or ""))
    return code if code in COUNTRIES else None


def country_left_out(traits: dict[str, Any]) -> bool:
    """A known country that is not one of Refersion's 90: the affiliate is created without it."""
    return country_code(str(traits.get("country") or "")) not in (None, *COUNTRIES)


@functools.lru_cache(maxsize=1024)
def country_code(value: str) -> str | None:
    """The ISO 3166-1 alpha-2 code of a country given as a code ("us", "USA", "840") or its ISO name
    ("United States", "United Kingdom"); None when pycountry knows no such country."""
    try:
        return str(pycountry.countries.lookup(value.strip()).alpha_2)
    except LookupError:
        return None


def numeric_id(change: Change) -> int | None:
    """The numeric affiliate id status_change takes, when known."""
    value = change.remote_id
    return int(value) if value and value.isascii() and value.isdigit() else None


class Refersion(Destination):
    kind = "refersion"
    segment_type = "identify"  # Segment's Refersion destination takes Identify (and delete)
    no_deletion = "no Refersion affiliate is known for this user (no affiliate code and no email)"
    count_notes = {
        "countries_left_out": "created %d affiliate(s) without their country: it is not one of the 90 that "
        "Refersion's API takes, which refuses the whole create for another"
    }
    settings_fields = frozenset({"api_base", "status", "offer", "send_welcome", "on_exit", "on_reentry"})
    default_rate_limit = 5.0

    def read_settings(self, problems: Problems, native: bool) -> None:
        self.on_exit = self._choice(problems, "on_exit", ("ignore", "disable"))
        self.on_reentry = self._choice(problems, "on_reentry", ("ignore", "activate"))
        self.status = self._choice(problems, "status", ("PENDING", "ACTIVE"))
        offer = self.settings.get("offer")
        if offer is not None and not (isinstance(offer, int | str) and str(offer).isdigit()):
            self.warnings.append(
                f"{self.where}: settings.offer is {offer!r}; Refersion takes an offer id such as "
                "'12345' and refuses every create with anything else"
            )
        if not native:
            return
        with problems.gather():
            self.api_base = base_url(
                self.settings.get("api_base", "https://api.refersion.com/v2"),
                f"{self.where}: settings.api_base",
            )
        key = self.needed_key(problems, f"{KEY_FORM} (none is set: fill api_key or api_key_env)")
        public, _, secret = key.partition(".")
        parts = public + secret
        if key and not (public and secret and parts.isascii() and parts.isprintable()):
            problems.add(
                f"{self.where}: {KEY_FORM} (the key given is not two non-empty parts of plain ASCII around "
                "a '.')"
            )
        self.headers = {"Refersion-Public-Key": public, "Refersion-Secret-Key": secret}

    def check(self, change: Change, message: dict[str, Any]) -> str | None:
        if not change.value or change.remote_id or change.remote_code:
            return None
        traits = change.traits
        first, last = split_name(traits)
        if self.transport is not None:
            # segment-docs, Refersion destination: an identify must contain `email` and `name` or first and
            # last name; it "can also only contain the name"
            if traits.get("email") and (traits.get("name") or (first and last)):
                return None
            return "Refersion's Segment destination needs email and a name (name, or first and last name)"
        name = str(traits.get("name") or "").strip()
        if not last and name and " " not in name:
            return (
                f"the name column holds one word ({name[:60]!r}): Refersion needs a first "
                "and a last name; return first_name and last_name, or a name with a space"
            )
        missing = [
            name
            for name, value in (
                ("email", traits.get("email")),
                ("first_name", first),
                ("last_name", last),
            )
            if not value
        ]
        if missing:
            return f"Refersion needs {', '.join(missing)} to create an affiliate"
        country = traits.get("country")
        if country not in (None, "") and not country_code(str(country)):
            return (
                f"the country column holds {str(country)[:60]!r}, which is not a country Refersion takes: "
                "return an ISO 3166-1 code (e.g. 'US') or the ISO name ('United States')"
            )
        return None

    def missing_columns(self, columns: Collection[str]) -> str | None:
        # the names as `check` reads them, from a value in each column that splits in two (for `name`)
        first, last = split_name(dict.fromkeys(columns, "given family"))
        found = (("email", "email" in columns), ("first_name", first), ("last_name", last))
        missing = [column for column, there in found if not there]
        if not missing:
            return None
        return (
            f"the query returns no {' or '.join(missing)} column (Refersion needs email, first_name and "
            "last_name, or name, to create an affiliate): every entry would be rejected"
        )

    def plan_native(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        done: list[Outcome] = []
        calls: list[Call] = []
        reactivate: list[Change] = []
        disable: list[Change] = []
        for change in changes:
            known = bool(change.remote_id or change.remote_code)
            if change.value and not known:
                calls.append(self._new_affiliate(change))
            elif change.value and change.remote_active:
                done.append(accepted(change))
            elif change.value and self.status != "ACTIVE" and self.on_reentry == "ignore":
                done.append(accepted(change, reason="left disabled (on_reentry: ignore)"))
            elif change.value:
                reactivate.append(change)
            elif self.on_exit == "ignore" or not change.remote_active:
                done.append(accepted(change))
            else:
                disable.append(change)
        for status, batch in (("ACTIVE", reactivate), ("DISABLED", disable)):
            unresolved = [c for c in batch if numeric_id(c) is None]
            calls += self._status_changes([c for c in batch if numeric_id(c) is not None], status)
            for change in unresolved:
                step = lookup.find(self._call, change, functools.partial(self._after_lookup, status))
                if isinstance(step, Call):
                    calls.append(step)
                else:
                    done += step
        return done, calls

    def probe_native(self) -> Call:
        """A search that finds nothing: read-only, and answered 401 to a wrong key (REFERENCE.md, Refersion:
        Errors)."""
        url = f"{self.api_base}/affiliate/search"
        return Call([], "POST", url, _read_probe, json={"keyword": PROBE_KEYWORD}, headers=self.headers)

    def page_size(self, value: bool) -> int:
        if value or self.transport is not None or self.on_exit != "disable":
            return super().page_size(value)
        # one status_change disables up to 50 affiliates: exits are planned, sent and recorded 50 at a time
        return max(self.limits.max_in_flight, STATUS_CHANGE_MAX_IDS)

    def segment_message(self, change: Change, message: dict[str, Any]) -> dict[str, Any]:
        """The identify with the member's address columns as the `address` object Refersion's Segment
        destination requires, in the case style of its names (segment-docs, Refersion destination)."""
        if message.get("type") != "identify":
            return message
        traits = dict(message.get("traits") or {})
        camel = "firstName" in traits or "lastName" in traits
        address = {}
        for name, columns in ADDRESS.items():
            values = [traits.pop(column) for column in columns if column in traits]
            value = next((v for v in values if v not in (None, "")), None)
            if value is not None:
                address["postalCode" if camel and name == "postal_code" else name] = value
        return {**message, "traits": {**traits, "address": address}}

    def forget_native(self, change: Change) -> Call | None:
        """Refersion has no delete endpoint: the affiliate is disabled."""
        if numeric_id(change) is not None:
            return self._status_change("DISABLED", change)
        step = lookup.find(self._call, change, functools.partial(self._status_change, "DISABLED"))
        return step if isinstance(step, Call) else None

    def _after_lookup(self, status: str, found: Change) -> list[Outcome] | Call:
        """The status change a lookup found the affiliate for; none to disable one already disabled or
        denied (by someone else: a user adopted from before, or one we never knew), nor to activate one
        already active (a change in doubt that arrived)."""
        if status == "DISABLED" and not found.remote_active:
            return [
                accepted(found, remote_active=False, reason="the affiliate already is disabled or denied")
            ]
        if status == "ACTIVE" and found.remote_active:
            return [accepted(found, remote_active=True, reason="the affiliate already is active")]
        return self._status_change(status, found)

    def _call(self, change: Change, path: str, body: dict[str, Any], read: lookup.Read, **extra: Any) -> Call:
        return Call(
            [change],
            "POST",
            f"{self.api_base}/affiliate/{path}",
            read,
            json=body,
            headers=self.headers,
            **extra,
        )

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
            body["offer"] = str(self.settings["offer"])
        address = {
            "address1": traits.get("street") or traits.get("address1"),
            "city": traits.get("city"),
            "state": traits.get("state"),
            "zip": traits.get("postal_code") or traits.get("zip"),
            "country": refersion_country(traits),
            "phone": traits.get("phone"),
        }
        body.update({k: str(v) for k, v in address.items() if v not in (None, "")})
        return self._call(change, "new", body, self._read_new, masked=("password",))

    def _read_new(self, call: Call, response: httpx.Response) -> list[Outcome] | Call:
        change = call.changes[0]
        if (
            response.status_code == 204
        ):  # Refersion's way of saying a field is invalid; its body is not reliable
            return [
                rejected(change, "Refersion answered 204: a field of the affiliate is invalid", refused=True)
            ]
        if response.status_code == 422 and "taken" in response.text:
            return lookup.search(self._call, change, str(change.traits.get("email")), self._adopted)
        if not response.is_success:
            raise FatalError(error_text(response), response.status_code)
        code = lookup.field(response, "id")
        # without its code the affiliate could never be disabled: not accepted, sent again next run
        if not isinstance(code, str | int) or isinstance(code, bool) or not str(code):
            return [failed(change, f"Refersion answered {response.status_code} without an affiliate code")]
        # the numeric id status_change takes, kept now; when the message does not give it, /affiliate/get
        # resolves it from the code the first time a status change needs it
        created = CREATED.search(str(lookup.field(response, "message") or ""))
        return [
            accepted(
                change,
                remote_code=str(code),
                remote_id=created[1] if created else None,
                remote_active=True,
                noted=("countries_left_out",) if country_left_out(change.traits) else (),
            )
        ]

    @staticmethod
    def _adopted(found: Change) -> list[Outcome]:
        """Adoption changes no status: a DISABLED or DENIED affiliate stays so, and its exit sends nothing."""
        return [
            accepted(
                found,
                reason=f"already an affiliate (email taken): adopted affiliate {found.remote_code}",
                remote_active=found.remote_active,
            )
        ]

    def _status_change(self, status: str, change: Change) -> Call:
        return self._status_changes([change], status)[0]

    def _status_changes(self, changes: list[Change], status: str) -> list[Call]:
        return [
            Call(
                batch,
                "POST",
                f"{self.api_base}/affiliate/status_change",
                _read_status_change,
                json={"ids": [numeric_id(c) for c in batch], "status": status},
                headers=self.headers,
            )
            for batch in (
                changes[i : i + STATUS_CHANGE_MAX_IDS] for i in range(0, len(changes), STATUS_CHANGE_MAX_IDS)
            )
        ]

    def secrets(self) -> list[str]:
        return super().secrets() + [v for v in getattr(self, "headers", {}).values()]


def _read_probe(call: Call, response: httpx.Response) -> list[Outcome] | Call:
    # REFERENCE.md (Refersion, /affiliate/search): a search that finds nothing answers 422 "Could not find
    # affiliates with this keyword.": the key was accepted (a refused one answers 401)
    return [] if lookup.no_match(response) else read_probe(call, response)


def _read_status_change(call: Call, response: httpx.Response) -> list[Outcome]:
    if response.status_code == 204:  # an invalid field: the same request would be refused again
        return [
            rejected(c, "Refersion answered 204: the status change has an invalid field", refused=True)
            for c in call.changes
        ]
    if not response.is_success:
        raise FatalError(error_text(response), response.status_code)
    ids = lookup.field(response, "ids_changed")
    changed = {str(i) for i in ids} if isinstance(ids, list) else set()
    active = call.json["status"] == "ACTIVE"
    return [
        accepted(c, remote_active=active)
        if c.remote_id in changed
        else failed(c, "Refersion did not change this affiliate's status (ids_not_changed)")
        for c in call.changes
    ]
