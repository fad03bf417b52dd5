"""The values the diff, the destinations and the state pass to each other: a change and what became of it."""

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sync.values import PLAIN, json_number, traits_text

# SQLite's json_object writes an infinite number as Inf (3.40) or 9.0e+999 (later versions), which Python
# would read as a float no message can carry; strings are matched so that they are skipped
SQLITE_INFINITY = re.compile(r'("(?:[^"\\]|\\.)*")|(-?)(?:Inf\b|(?<![\d.])9\.0e\+999\b)')
# NaN, Infinity and -Infinity tokens (stored before issue 21) become that text; numbers keep their digits
DECODER = json.JSONDecoder(parse_constant=str, parse_float=json_number)


class Status(StrEnum):
    """What became of a change. The values are stored (`sync_runs` counts) and shown: never rename them."""

    ACCEPTED = "accepted"  # the destination took it: the state advances
    REJECTED = "rejected"  # refused for this user: logged (an exit's state still advances)
    SKIPPED = "skipped"  # nothing to send for it (no event mapping): the state advances
    FAILED = "failed"  # not accepted yet: pending, sent again on the next run
    TO_SEND = "to_send"  # a dry run's: it would be sent


@dataclass(slots=True)  # not frozen, and slots: the diff builds millions, frozen ones take 4x as long
class Change:
    """One user's membership change on one connection, as the diff found it (not changed after)."""

    user_id: str
    value: bool  # True: entered, False: exited
    traits_text: str  # the traits as stored (JSON): a rejected entry is retried once they change
    # how many earlier changes of this user the connection settled (the state advanced: accepted, skipped,
    # or an exit rejected), from `sync_state.changes`; it makes a re-entry's messageId a new one
    settled_before: int
    remote_id: str | None = None  # the destination's id for the user (Refersion: the numeric affiliate id)
    remote_active: bool = True  # False once we disabled it (Refersion)
    remote_code: str | None = None  # another id the destination gave it (Refersion: the affiliate code)
    # set by the sender when a request carrying the change went out and got no answer: it may have arrived
    in_doubt: bool = False
    _traits: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def traits(self) -> dict[str, Any]:
        """Current traits for an entry; the traits last sent for an exit (decoded when first used)."""
        if self._traits is None:
            text = self.traits_text
            if "Inf" in text or "e+999" in text:  # rare; the substring tests spare the others the regex
                text = SQLITE_INFINITY.sub(lambda m: m[1] or f'"{m[2]}Infinity"', text)
            self._traits = DECODER.decode(text)
        return self._traits


@dataclass(frozen=True)
class Outcome:
    """What became of one change, and what the destination told of the user."""

    change: Change
    status: Status
    reason: str | None = None
    remote_id: str | None = None
    remote_active: bool | None = None
    remote_code: str | None = None
    # a rejection by the destination's answer to the request, which may be about its settings, not the user
    refused: bool = False
    # a rejection that refused nothing: what the change wanted already holds (an exit whose user has no
    # affiliate to disable); recorded with its reason, but no sign of a broken configuration
    nothing_to_do: bool = False
    noted: tuple[str, ...] = ()  # run counts (`Destination.count_notes`) this outcome adds one to


def accepted(change: Change, **extra: Any) -> Outcome:
    return Outcome(change, Status.ACCEPTED, **extra)


def rejected(change: Change, reason: str, refused: bool = False, nothing_to_do: bool = False) -> Outcome:
    return Outcome(change, Status.REJECTED, reason, refused=refused, nothing_to_do=nothing_to_do)


def failed(change: Change, reason: str) -> Outcome:
    """Not accepted yet: the change stays pending."""
    return Outcome(change, Status.FAILED, reason)


def traits_json(traits: dict[str, Any]) -> str:
    """A member's traits as staged (sync.values), from their Python values."""
    return traits_text(list(traits), [PLAIN] * len(traits), list(traits.values()))
