"""Where a connection's changes go: a destination (`Delivering`) or a dry run's JSON lines (`DryRun`).

Both take a page of changes, build their messages, check them locally, plan the requests and return one
outcome per change. Neither touches the state database: the connection's run records what they return.
"""

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol, TextIO

from sync.connections import Link
from sync.delivery import Delivery, Sender
from sync.destinations.base import Destination
from sync.destinations.http import Call
from sync.messages import build_message
from sync.models import Change, Outcome, Status, accepted, rejected


class Sink(Protocol):
    writes: bool  # its outcomes are recorded in the state database (False: a dry run)

    def send(self, link: Link, destination: Destination, page: list[Change]) -> list[Outcome]: ...

    def held(self) -> list[Outcome]:
        """Outcomes held back until the end of the connection's run."""
        ...

    def stop_reason(self) -> str | None:
        """Why the connection's run stops after the page just sent, if it does."""
        ...

    def counted(self) -> dict[str, int]:
        """Requests sent and retried so far (for the progress bars)."""
        ...


Planned = tuple[dict[str, dict[str, Any]], list[Outcome], list[Call]]


def planned(link: Link, destination: Destination, page: list[Change], now: datetime) -> Planned:
    """The page's messages by user id, the outcomes known without a request, and the requests to send."""
    messages = {c.user_id: destination.message(c, build_message(link, c, now)) for c in page}
    outcomes: list[Outcome] = []
    sendable = []
    for change in page:
        reason = destination.check(change, messages[change.user_id])
        if reason:
            outcomes.append(rejected(change, reason))
        else:
            sendable.append(change)
    done, calls = destination.plan(sendable, messages, link.event)
    return messages, outcomes + done, calls


class Delivering:
    """Sends each page to the destination through its Sender (one Delivery per connection's run)."""

    writes = True

    def __init__(self, sender: Sender, now: Callable[[], datetime]) -> None:
        self.delivery = Delivery(sender)
        self.now = now
        self.sender = sender
        self.before = dict(sender.counted)  # the Sender is the destination's, shared by its connections

    def send(self, link: Link, destination: Destination, page: list[Change]) -> list[Outcome]:
        _, outcomes, calls = planned(link, destination, page, self.now())
        return outcomes + self.delivery.send_all(calls)

    def held(self) -> list[Outcome]:
        return self.delivery.held()

    def stop_reason(self) -> str | None:
        stopped = self.delivery.stopped
        return stopped.reason if stopped else None

    def counted(self) -> dict[str, int]:
        return {what: n - self.before[what] for what, n in self.sender.counted.items()}


class _SendsNothing:
    """A sink that makes no request: nothing held back, no reason to stop, nothing counted."""

    def held(self) -> list[Outcome]:
        return []

    def stop_reason(self) -> str | None:
        return None

    def counted(self) -> dict[str, int]:
        return {}


class DryRun(_SendsNothing):
    """Writes what would be sent as JSON lines to `out` (if any); every change would be sent: `to_send`."""

    writes = False

    def __init__(self, out: TextIO | None, now: Callable[[], datetime]) -> None:
        self.out = out
        self.now = now

    def send(self, link: Link, destination: Destination, page: list[Change]) -> list[Outcome]:
        messages, outcomes, calls = planned(link, destination, page, self.now())
        if self.out is not None:
            lines: list[tuple[dict[str, Any], dict[str, Any]]] = [
                (messages[o.change.user_id], {} if o.status == Status.ACCEPTED else {str(o.status): o.reason})
                for o in outcomes
            ] + [
                (messages[change.user_id], {} if destination.transport else {"request": call.describe()})
                for call in calls
                for change in call.changes
            ]
            for message, extra in lines:
                line = {"destination": destination.name, "message": message, **extra}
                self.out.write(json.dumps(line) + "\n")
        return [Outcome(o.change, Status.TO_SEND) if o.status == Status.ACCEPTED else o for o in outcomes] + [
            Outcome(c, Status.TO_SEND) for call in calls for c in call.changes
        ]


class Baseline(_SendsNothing):
    """Records every change as accepted and sends nothing: the destination already holds these members (a
    move from Segment Engage). The destination's own ids stay unknown until a change needs them."""

    writes = True

    def send(self, link: Link, destination: Destination, page: list[Change]) -> list[Outcome]:
        return [accepted(change) for change in page]
