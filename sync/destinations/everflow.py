"""Everflow: membership changes as advertiser-event server postbacks, keyed by click transaction id."""

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from sync.destinations import Call, Destination, Outcome, base_url, read_accepting
from sync.errors import ConfigError
from sync.messages import Change


class Everflow(Destination):
    kind = "everflow"
    settings_fields = frozenset({"tracking_domain", "network_id", "verification_token", "event_mapping"})
    default_rate_limit = 20.0

    def __init__(self, row: sa.Row[Any], settings: dict[str, Any], api_key: str | None) -> None:
        super().__init__(row, settings, api_key)
        self.event_mapping: dict[str, Any] = settings.get("event_mapping") or {}
        if not isinstance(self.event_mapping, dict) or not all(
            isinstance(v, int | str) and not isinstance(v, bool) for v in self.event_mapping.values()
        ):
            raise ConfigError(
                f"{self.where}: settings.event_mapping must map event names to advertiser event ids"
            )
        if self.transport is None:
            self.tracking_domain = base_url(
                settings.get("tracking_domain"), f"{self.where}: settings.tracking_domain"
            )
            network_id = settings.get("network_id")
            if network_id in (None, ""):
                raise ConfigError(f"{self.where}: settings.network_id is required")
            if isinstance(network_id, bool) or not isinstance(network_id, int | str):
                raise ConfigError(
                    f"{self.where}: settings.network_id must be a whole number or text, not {network_id!r}"
                )
            self.network_id = str(network_id)
            self.verification_token = settings.get("verification_token")
            if not isinstance(self.verification_token, str | None):
                raise ConfigError(f"{self.where}: settings.verification_token must be text")

    def secrets(self) -> list[str]:
        token = self.settings.get("verification_token")
        return super().secrets() + ([str(token)] if token else [])

    def check(self, change: Change, message: dict[str, Any]) -> str | None:
        if change.traits.get("transaction_id") in (None, ""):
            return "Everflow requires a TransactionId (the audience query gives no transaction_id)"
        return None

    def plan_native(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        skipped: list[Outcome] = []
        calls: list[Call] = []
        for change in changes:
            name = event(change.value)
            if name not in self.event_mapping:
                skipped.append(Outcome(change, "skipped", f"no event_mapping for {name!r}"))
                continue
            params = {
                "nid": self.network_id,
                "transaction_id": str(change.traits["transaction_id"]),
                "adv_event_id": str(self.event_mapping[name]),
            }
            if self.verification_token:
                params["verification_token"] = str(self.verification_token)
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
