"""Refersion's REST API v2 (affiliates), as its OpenAPI reference documents it."""

from __future__ import annotations

import itertools
import re
from typing import Any

from sync.sandbox.everflow import _is_int
from sync.sandbox.fake import FakeServer
from sync.sandbox.http import Recorded, Response, _json
from sync.sandbox.refersion_list import list_page

# Refersion REST API v2 reference (OpenAPI, affiliate/new, country): "Country Code (two letter abbreviation)
# must match one of" these 90. Kept apart from the product's copy: the emulation holds to the reference
# whatever the product believes.
COUNTRIES = frozenset(
    "US, AE, AR, AS, AT, AU, BA, BD, BE, BG, BR, CA, CH, CL, CN, CO, CR, CZ, DE, DK, DZ, EE, ES, FI, "
    "FM, FO, FR, GB, GH, GR, GU, HK, HN, HR, HU, ID, IE, IL, IM, IN, IS, IT, JM, JP, KR, KW, LT, LU, "
    "LV, MA, MH, MK, MP, MT, MX, MY, NG, NL, NO, NZ, OM, PE, PH, PK, PL, PR, PT, PW, QA, RO, RS, RU, "
    "SA, SE, SG, SI, SK, SV, TH, TN, TR, TW, TZ, UA, UY, VG, VI, VN, WS, ZA".split(", ")
)


class RefersionServer(FakeServer):
    """Refersion REST API v2: `/v2/affiliate/new`, `/get`, `/search`, `/list` and `/status_change`.

    Affiliates are keyed by their numeric id; each also has a string code, which is what `/affiliate/new` and
    `/affiliate/search` answer as `id`.
    """

    def __init__(self, *, public_key: str = "pub", secret_key: str = "sec", **kwargs: Any) -> None:
        self.public_key = public_key
        self.secret_key = secret_key
        self.affiliates: dict[int, dict[str, Any]] = {}
        self.not_changeable: set[int] = set()  # numeric ids status_change refuses (ids_not_changed)
        self._listed: list[dict[str, Any]] | None = None  # the affiliates /affiliate/list pages, oldest first
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): results come in pages (`page`); the
        # page size is not documented; chosen here.
        self.search_page_size = 10
        # Refersion REST API v2 reference (OpenAPI, affiliate/new): `offer` "defaults to your default offer";
        # the default offer's id is not documented; chosen here (the OpenAPI example's offer_id).
        self.default_offer = "1234"
        # Refersion REST API v2 reference (OpenAPI, affiliate/new example): "The affiliate 37569297 has been
        # created", code "a3y7". How ids and codes are made is not documented; chosen here: numbers counting
        # up from the example, codes "c" + hex counter, so a code is never all digits.
        self._ids = itertools.count(37569297)
        self._codes = itertools.count(0xA37)
        super().__init__(**kwargs)

    def add_affiliate(self, email: str, **fields: Any) -> int:
        """Store an affiliate that exists before the test (status ACTIVE unless given); its numeric id."""
        with self._lock:
            return self._store({"status": "ACTIVE", **fields, "email": email})

    def change_by_hand(self, code: str, status: str | None = None) -> None:
        """What a merchant does in Refersion's dashboard behind the product's back: set the affiliate's
        status (ACTIVE, PENDING, DENIED, DISABLED), or with none delete it."""
        with self._lock:
            affiliate = self._by_code(code)
            if affiliate is None:
                raise KeyError(code)
            if status is None:
                del self.affiliates[affiliate["id"]]
                self._listed = None
            else:
                affiliate["status"] = status

    def code_of(self, affiliate_id: int) -> str:
        """The code of the affiliate with this numeric id (KeyError when there is none)."""
        with self._lock:
            return str(self.affiliates[affiliate_id]["code"])

    def by_code(self, code: str) -> dict[str, Any] | None:
        """The stored affiliate with this code, or None."""
        with self._lock:
            return self._by_code(code)

    def _by_code(self, code: str) -> dict[str, Any] | None:
        return next((a for a in self.affiliates.values() if a["code"] == code), None)

    def _store(self, fields: dict[str, Any]) -> int:
        affiliate_id = next(self._ids)
        fields.pop("password", None)
        self.affiliates[affiliate_id] = {**fields, "id": affiliate_id, "code": f"c{next(self._codes):x}"}
        self._listed = None
        return affiliate_id

    def _list(self, data: dict[str, Any]) -> Response:
        # ids count up and are stored in that order: the list is the oldest first. Kept between pages: a
        # million affiliates are listed 10,000 times.
        if self._listed is None:
            self._listed = list(self.affiliates.values())
        return list_page(data, self._listed, self._offer_id)

    def _link(self, affiliate: dict[str, Any]) -> str:
        # Refersion REST API v2 reference (OpenAPI, affiliate/new example): link
        # "https://site.refersion.com/c/a3y7".
        return f"{self.url}/c/{affiliate['code']}"

    def _handle(self, rec: Recorded) -> Response:
        # Refersion REST API v2 reference (OpenAPI, 401_Error): headers Refersion-Public-Key and
        # Refersion-Secret-Key, else 401 "Invalid API credentials (error 2)."
        keys = (rec.headers.get("refersion-public-key"), rec.headers.get("refersion-secret-key"))
        if keys != (self.public_key, self.secret_key):
            return _json(401, {"error": "Invalid API credentials (error 2)."})
        routes = {
            "/v2/affiliate/new": self._new,
            "/v2/affiliate/get": self._get,
            "/v2/affiliate/search": self._search,
            "/v2/affiliate/list": self._list,
            "/v2/affiliate/status_change": self._status_change,
        }
        # Refersion REST API v2 reference (OpenAPI): every call is a POST under /v2. An unknown path's answer
        # is not documented; chosen here: 404 with an empty body.
        route = routes.get(rec.path) if rec.method == "POST" else None
        if route is None:
            return 404, b"", {}
        # Refersion REST API v2 reference (OpenAPI, 404_Error): "Empty request body" -> "Bad request, no
        # body". Chosen here: a body that is not a JSON object counts as no body; `{}` is a body missing its
        # fields.
        if not isinstance(rec.json, dict):
            return _json(404, {"error": "Bad request, no body"})
        return route(rec.json)

    def _new(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/new; 400_Error "Missing required field X"):
        # required first_name, last_name, email, password, status.
        for name in ("first_name", "last_name", "email", "password", "status"):
            if not data.get(name):
                return _json(400, {"error": f"Missing required field {name}"})
        email = str(data["email"])
        # Refersion REST API v2 reference (OpenAPI, affiliate/new, password) / REFERENCE.md: 9-72 characters,
        # upper, lower, digit, special, no character more than 3 times in a row, not the email. The answer's
        # shape is not documented; chosen here: 400 with the ErrorResponse shape {"errors": [...]}.
        errors = _password_errors(str(data["password"]), email)
        if errors:
            return _json(400, {"errors": errors})
        # Refersion REST API v2 reference (OpenAPI, affiliate/new): status enum ACTIVE, PENDING. REFERENCE.md:
        # a 204 with a body means an invalid field, on every operation.
        if data["status"] not in ("ACTIVE", "PENDING"):
            return _json(204, {"errors": ["Invalid status"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/new): country (pattern ^[A-Z]+, length 2) "must
        # match one of" 90 codes (COUNTRIES); 422 example "X is not a allowed value for field Y".
        if "country" in data and data["country"] not in COUNTRIES:
            return _json(422, {"errors": [f"{data['country']} is not a allowed value for field country"]})
        # Refersion REST API v2 reference (OpenAPI, 422_Error) / REFERENCE.md: the taken-email message.
        # Compared case-insensitively: chosen here (email addresses are matched that way in practice).
        if any(str(a.get("email", "")).casefold() == email.casefold() for a in self.affiliates.values()):
            return _json(422, {"errors": ["The email you have entered is taken by another Affiliate."]})
        affiliate_id = self._store({**data, "has_password": True})
        affiliate, status = self.affiliates[affiliate_id], data["status"]
        self.accepted[(data.get("unique_merchant_id") or email, "new")] += 1
        # Refersion REST API v2 reference (OpenAPI, affiliate/new 200): `id` is the affiliate's code (a
        # string); the numeric id is only in the message text.
        return _json(
            200,
            {
                "id": affiliate["code"],
                "link": self._link(affiliate),
                "message": f"The affiliate {affiliate_id} has been created with the status of {status}.",
            },
        )

    def _get(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/get): oneOf {"id": <integer>} or
        # {"affiliate_code": <string>}. Chosen here: id wins when both are sent; an id that is not an integer
        # (a string of digits included) finds nothing.
        if data.get("id") is not None:
            affiliate_id = data["id"]
            affiliate = self.affiliates.get(affiliate_id) if _is_int(affiliate_id) else None
        elif data.get("affiliate_code") is not None:
            affiliate = self._by_code(str(data["affiliate_code"]))
        else:
            return _json(400, {"error": "Missing required field id or affiliate_code"})
        # An unknown affiliate's answer is not documented; chosen here: 422 in the ErrorResponse shape.
        if affiliate is None:
            return _json(422, {"errors": ["Affiliate not found"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/get 200 example): numeric `id`, offer_id,
        # status, names, company_name, email, link, custom_fields.
        return _json(
            200,
            {
                "id": affiliate["id"],
                "offer_id": self._offer_id(affiliate),
                "status": affiliate["status"],
                "first_name": affiliate.get("first_name", ""),
                "last_name": affiliate.get("last_name", ""),
                "company_name": affiliate.get("company", ""),
                "email": affiliate["email"],
                "link": self._link(affiliate),
                "custom_fields": [],
            },
        )

    def _search(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): `keyword` required.
        keyword = data.get("keyword")
        if keyword is None or keyword == "":
            return _json(400, {"error": "Missing required field keyword"})
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): `page` (a string, default "1"). An int
        # is accepted too; a page that is not a positive number is an invalid field: 204 with a body
        # (REFERENCE.md).
        page = data.get("page", 1)
        if isinstance(page, str) and page.strip().isdigit():
            page = int(page)
        if not _is_int(page) or page < 1:
            return _json(204, {"errors": ["Invalid page"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): "Affiliate ID must be exact; email can
        # be a partial match"; the results' `id` is the affiliate's code. Case-insensitive email match: chosen
        # here. first_name / last_name: their matching rule is not documented; chosen here: ignored.
        keyword = str(keyword)
        matches = [
            self.affiliates[n]
            for n in sorted(self.affiliates)
            if self.affiliates[n]["code"] == keyword
            or keyword.casefold() in str(self.affiliates[n].get("email", "")).casefold()
        ]
        # Refersion REST API v2 reference (OpenAPI, affiliate/search 422 example): "Could not find affiliates
        # with this keyword." when nothing matches.
        if not matches:
            return _json(422, {"errors": ["Could not find affiliates with this keyword."]})
        start = (page - 1) * self.search_page_size
        # Refersion REST API v2 reference (OpenAPI, affiliate/search 200): total and results (id = code,
        # offer_id, status, first_name, last_name, email, custom_fields).
        results = [
            {
                "id": a["code"],
                "offer_id": self._offer_id(a),
                "status": a["status"],
                "first_name": a.get("first_name", ""),
                "last_name": a.get("last_name", ""),
                "email": a["email"],
                "custom_fields": [],
            }
            for a in matches[start : start + self.search_page_size]
        ]
        return _json(200, {"total": len(matches), "results": results})

    def _offer_id(self, affiliate: dict[str, Any]) -> str:
        # Refersion REST API v2 reference (OpenAPI, affiliate/get): offer_id is a string.
        return str(affiliate.get("offer") or self.default_offer)

    def _status_change(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): required ids (array of integers)
        # and status; 400_Error "Missing required field X".
        ids, status = data.get("ids"), data.get("status")
        if not isinstance(ids, list):
            return _json(400, {"error": "Missing required field ids"})
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): "Limit of 50 IDs per call". The
        # answer to more is not documented; chosen here: 400.
        if len(ids) > 50:
            return _json(400, {"error": "A maximum of 50 ids is allowed"})
        if status is None or status == "":
            return _json(400, {"error": "Missing required field status"})
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): ids is an array of integers; an
        # invalid field -> 204 with a body (REFERENCE.md). A code or a string of digits is such a field.
        if not all(_is_int(i) for i in ids):
            return _json(204, {"errors": ["Invalid field ids"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): status enum ACTIVE, DENIED,
        # DISABLED (PENDING cannot be set); an invalid field -> 204 with a body (REFERENCE.md).
        if status not in ("ACTIVE", "DENIED", "DISABLED"):
            return _json(204, {"errors": ["Invalid status"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change 200): ids_changed /
        # ids_not_changed, answered 200 even when some were not changed.
        changed, not_changed = [], []
        for affiliate_id in ids:
            if affiliate_id in self.affiliates and affiliate_id not in self.not_changeable:
                self.affiliates[affiliate_id]["status"] = status
                self.accepted[(affiliate_id, status)] += 1
                changed.append(affiliate_id)
            else:
                not_changed.append(affiliate_id)
        return _json(200, {"ids_changed": changed, "ids_not_changed": not_changed})


def _password_errors(password: str, email: str) -> list[str]:
    # Refersion REST API v2 reference (OpenAPI, affiliate/new, password) / REFERENCE.md; the messages are
    # chosen here.
    rules = [
        (9 <= len(password) <= 72, "Password must be 9 to 72 characters long"),
        (re.search(r"[A-Z]", password), "Password must contain an upper-case letter"),
        (re.search(r"[a-z]", password), "Password must contain a lower-case letter"),
        (re.search(r"[0-9]", password), "Password must contain a digit"),
        (re.search(r"[^A-Za-z0-9]", password), "Password must contain a special character"),
        (
            not re.search(r"(.)\1{3}", password),
            "Password must not repeat a character more than 3 times in a row",
        ),
        (password.casefold() != email.casefold(), "Password must not be the email address"),
    ]
    return [message for ok, message in rules if not ok]
