"""The Segment message: identify by default, track per connection, stable messageIds."""

import json
from datetime import UTC, datetime

import pytest

from sync.connections import Link
from sync.errors import ConfigError
from sync.messages import build_message
from sync.models import Change, traits_json

NOW = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
TRAITS = {"email": "a@example.com", "first_name": "Ada", "transaction_id": "tid-1"}


def connection(**settings: str) -> Link:
    return Link.from_settings(
        settings,
        "row",
        audience_id=7,
        audience_key="order_completed_last_30_days",
        destination_id=3,
        destination_name="Everflow",
    )


def change(value: bool = True, settled_before: int = 0) -> Change:
    return Change("u123", value, json.dumps(TRAITS), settled_before)


def test_identify_message_matches_the_spec() -> None:
    message = build_message(connection(), change(), NOW)
    assert message["type"] == "identify"
    assert message["userId"] == "u123"
    assert message["traits"] == {"order_completed_last_30_days": True, **TRAITS}
    assert message["context"]["personas"] == {
        "computation_class": "audience",
        "computation_id": "aud_7",
        "computation_key": "order_completed_last_30_days",
        "namespace": "spa_default",
        "space_id": "spa_default",
    }
    assert message["context"]["referrer"] == {"type": "everflow", "id": "tid-1"}
    assert message["context"]["library"]["name"] == "audience-sync"
    assert message["integrations"] == {"All": False, "Everflow": True}
    assert message["timestamp"] == "2026-11-22T10:00:00.123Z"
    assert len(message["messageId"]) < 100


def test_track_message_for_an_exit() -> None:
    message = build_message(connection(type="track", exited_event="Left VIP"), change(value=False), NOW)
    assert message["type"] == "track"
    assert message["event"] == "Left VIP"
    assert message["properties"] == {
        "audience_key": "order_completed_last_30_days",
        "order_completed_last_30_days": False,
    }
    assert message["context"]["traits"] == TRAITS
    assert "traits" not in message


def test_message_id_is_stable_for_a_resend_and_new_for_a_reentry() -> None:
    first = build_message(connection(), change(settled_before=0), NOW)["messageId"]
    assert build_message(connection(), change(settled_before=0), datetime.now(UTC))["messageId"] == first
    exit_id = build_message(connection(), change(value=False, settled_before=1), NOW)["messageId"]
    reentry = build_message(connection(), change(settled_before=2), NOW)["messageId"]
    assert len({first, exit_id, reentry}) == 3


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"type": "page"}, "settings.type must be 'identify' or 'track'"),
        ({"entered_event": ""}, "settings.entered_event must be a non-empty text"),
        ({"exit_event": "x"}, "unknown field(s) exit_event"),
    ],
)
def test_bad_connection_settings(settings: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        connection(**settings)


def test_non_finite_numbers_become_null() -> None:
    traits = {"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5, "e": "NaN"}
    expected = {"a": None, "b": None, "c": None, "d": 1.5, "e": "NaN"}  # README "How values are sent"
    assert json.loads(traits_json(traits)) == expected  # strict JSON: json.loads would take NaN too
    assert "NaN," not in traits_json(traits) and "Infinity," not in traits_json(traits)
    nested = {"scores": [1.0, float("nan")], "by_day": {"mon": float("-inf")}}
    assert json.loads(traits_json(nested)) == {"scores": [1.0, None], "by_day": {"mon": None}}
    # traits staged before the rules (issue 21) are read as they were: SQLite's json_object wrote an
    # infinite number as a bare Inf (3.40) or as 9.0e+999 (later versions);
    # a string that says so stays as it is, and so does a number that only ends like one
    staged = Change("u1", True, '{"b":Inf,"c":-Inf,"d":1.5,"Inf":"x:Inf,\\"Inf"}', 0)
    assert staged.traits == {"b": "Infinity", "c": "-Infinity", "d": 1.5, "Inf": 'x:Inf,"Inf'}
    later = Change("u1", True, '{"b":9.0e+999,"c":-9.0e+999,"d":[NaN],"e":"9.0e+999","f":1.5e+99}', 0)
    assert later.traits == {"b": "Infinity", "c": "-Infinity", "d": ["NaN"], "e": "9.0e+999", "f": 1.5e99}
