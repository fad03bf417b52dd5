"""Everflow: membership changes as advertiser-event server postbacks, keyed by click transaction id.

A postback's 200 means the endpoint received it: Everflow may still reject the conversion (an invalid
transaction id, an event not in the offer, a duplicate) and says so only in its own reports.
"""

import math
from collections.abc import Callable, Collection
from typing import Any

from sync.destinations.base import Destination
from sync.destinations.http import Call, base_url, read_accepting
from sync.errors import ConfigError, Problems
from sync.models import Change, Outcome, Status
from sync.settings import env_name, secret_from_env

# The optional postback parameters a member's traits may fill (Everflow's advertiser postback macros)
PARAMS = frozenset({"amount", "order_id", "coupon_code", "email", *(f"adv{i}" for i in range(1, 6))})
# The track properties Everflow's Segment destination maps to those parameters (segment-docs, Everflow
# destination: adv1..adv5, `total`, `orderId`; Segment's spec names the coupon `coupon`); custom properties
# are not supported, and the member's email already travels in context.traits
SEGMENT_PROPERTIES = {
    "amount": "total",
    "order_id": "orderId",
    "coupon_code": "coupon",
    **{f"adv{i}": f"adv{i}" for i in range(1, 6)},
}
# An event mapped to this id is the base conversion, whose postback carries no adv_event_id (Everflow's
# advertiser postback docs; "Base Conversion" in Segment's Everflow event mapping)
BASE_CONVERSION = "0"
# REFERENCE.md (Everflow, REST API): the Network API's base
REPORTING_API_BASE = "https://api.eflow.team/v1"


class Everflow(Destination):
    kind = "everflow"
    segment_type = "track"  # Segment's Everflow destination takes Track calls only
    # segment-docs catalog: Everflow's methods are track only: no delete reaches it
    segment_deletes = False
    no_deletion = "Everflow keeps no profile to delete: it records conversions only"
    settings_fields = frozenset(
        {
            "tracking_domain",
            "network_id",
            "verification_token",
            "event_mapping",
            "aid",
            "params",
            "reporting_api_key_env",
            "reporting_api_base",
        }
    )
    default_rate_limit = 20.0

    def read_settings(self, problems: Problems, native: bool) -> None:
        self.event_mapping: dict[str, Any] = self.settings.get("event_mapping") or {}
        if not isinstance(self.event_mapping, dict) or not all(
            isinstance(v, int | str) and not isinstance(v, bool) for v in self.event_mapping.values()
        ):
            problems.add(f"{self.where}: settings.event_mapping must map event names to advertiser event ids")
        with problems.gather():
            self.params = self._params()
        # why reconcile cannot read Everflow's reports (None: it can, with this key from this variable)
        self.unverifiable: str | None = "the Segment transport has no read API to verify postbacks with"
        self.reporting_key_env: str | None = None
        self.reporting_api_key: str | None = None
        self.reporting_api_base = REPORTING_API_BASE
        if native:
            self._postback_settings(problems)
            self._reporting_settings(problems)

    def catalog_settings(self, api_key: str) -> dict[str, Any]:
        # segment-docs src/_data/catalog/destinations.yml, Everflow: apiKey (string) and eventMapping (a
        # text-map: event name -> advertiser event id, text)
        mapping = self.event_mapping if isinstance(self.event_mapping, dict) else {}
        return {"apiKey": api_key, "eventMapping": {name: str(id_) for name, id_ in mapping.items()}}

    def segment_message(self, change: Change, message: dict[str, Any]) -> dict[str, Any]:
        """The track message with `settings.params` as the properties Everflow's Segment destination maps."""
        values = self._param_values(change)
        mapped = {SEGMENT_PROPERTIES[p]: v for p, v in values.items() if p in SEGMENT_PROPERTIES}
        if "total" in mapped:  # a number in Segment's spec; property types must match Everflow's
            mapped["total"] = _number(mapped["total"])
        return {**message, "properties": {**message.get("properties", {}), **mapped}}

    def _param_values(self, change: Change) -> dict[str, Any]:
        """The optional postback parameters the change's traits fill (a NULL or empty trait fills none)."""
        found = {param: change.traits.get(trait) for param, trait in self.params.items()}
        return {param: value for param, value in found.items() if value not in (None, "")}

    def _postback_settings(self, problems: Problems) -> None:
        """Where postbacks go, and what each one carries."""
        with problems.gather():
            self.tracking_domain = base_url(
                self.settings.get("tracking_domain"), f"{self.where}: settings.tracking_domain"
            )
        with problems.gather():
            network_id = self._id_setting("network_id")
            if network_id is None:
                raise ConfigError(f"{self.where}: settings.network_id is required")
            self.network_id = network_id
        with problems.gather():
            self.aid = self._id_setting("aid")
        self.verification_token = self.settings.get("verification_token")
        if not isinstance(self.verification_token, str | None):
            problems.add(f"{self.where}: settings.verification_token must be text")

    def _reporting_settings(self, problems: Problems) -> None:
        """The Network API key that lets reconcile read Everflow's conversion report, and where that API is.

        A malformed setting is a problem of the row; a variable that is not set only keeps reconcile from
        verifying (a warning for `check`): postbacks need no key.
        """
        with problems.gather():
            self.reporting_api_base = base_url(
                self.settings.get("reporting_api_base") or REPORTING_API_BASE,
                f"{self.where}: settings.reporting_api_base",
            )
        variable = self.settings.get("reporting_api_key_env")
        if variable in (None, ""):
            self.unverifiable = (
                "no reporting key: settings.reporting_api_key_env names no environment variable holding an "
                "Everflow Network API key"
            )
            return
        where = f"{self.where}: settings.reporting_api_key_env"
        with problems.gather():
            self.reporting_key_env = env_name(variable, where, "the Network API key")
            try:
                self.reporting_api_key = secret_from_env(variable, where, "the Network API key")
                self.unverifiable = None
            except ConfigError as exc:
                self.unverifiable = f"{exc}: reconcile cannot read Everflow's reports"
                self.warnings.append(f"{self.unverifiable} (postbacks need no key)")

    def _id_setting(self, name: str) -> str | None:
        """A whole number or text; None when left out."""
        value = self.settings.get(name)
        if value in (None, ""):
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{self.where}: settings.{name} must be a whole number or text, not {value!r}")
        return str(value)

    def _params(self) -> dict[str, str]:
        """The optional postback parameters, each with the trait that fills it."""
        params = self.settings.get("params") or {}
        if not isinstance(params, dict) or not all(isinstance(v, str) and v for v in params.values()):
            raise ConfigError(
                f"{self.where}: settings.params must map postback parameters to trait names, "
                'e.g. {"amount": "order_total"}'
            )
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise ConfigError(
                f"{self.where}: settings.params names unknown postback parameter(s) {', '.join(unknown)} "
                "(Everflow takes amount, order_id, coupon_code, email and adv1 to adv5)"
            )
        return params

    def secrets(self) -> list[str]:
        token = self.settings.get("verification_token")
        reporting = [self.reporting_api_key] if self.reporting_api_key else []
        return super().secrets() + ([str(token)] if token else []) + reporting

    def probe_native(self) -> str:
        # REFERENCE.md (Everflow): a postback answers 200 even when Everflow rejects the conversion; an
        # invalid verification token shows only in Everflow's reports
        return (
            "Everflow postbacks carry no credential a call could prove: a postback is answered 200 whatever "
            "its network id and verification token, which Everflow checks only in its own reports"
        )

    def check(self, change: Change, message: dict[str, Any]) -> str | None:
        if change.traits.get("transaction_id") in (None, ""):
            return "Everflow requires a TransactionId (the audience query gives no transaction_id)"
        return None

    def missing_columns(self, columns: Collection[str]) -> str | None:
        if "transaction_id" in columns:
            return None
        return (
            "the query returns no transaction_id column (Everflow requires a TransactionId for every "
            "conversion): every change would be rejected"
        )

    def plan_native(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        skipped: list[Outcome] = []
        calls: list[Call] = []
        for change in changes:
            name = event(change.value)
            if name not in self.event_mapping:
                skipped.append(Outcome(change, Status.SKIPPED, f"no event_mapping for {name!r}"))
                continue
            params = {"nid": self.network_id, "transaction_id": str(change.traits["transaction_id"])}
            event_id = str(self.event_mapping[name]).strip()
            if event_id != BASE_CONVERSION:
                params["adv_event_id"] = event_id
            if self.verification_token:
                params["verification_token"] = str(self.verification_token)
            if self.aid:
                params["aid"] = self.aid
            params.update({param: str(value) for param, value in self._param_values(change).items()})
            calls.append(
                Call(
                    [change],
                    "GET",
                    self.tracking_domain + "/",
                    read_accepting,
                    params=params,
                    masked=("verification_token",),
                )
            )
        return skipped, calls


def _number(value: Any) -> Any:
    """A number given as text ("19.90") as a number; anything else as it is."""
    try:
        number = float(value) if isinstance(value, str) else None
    except ValueError:
        number = None
    return number if number is not None and math.isfinite(number) else value
