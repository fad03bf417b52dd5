"""The process's Senders: one per destination, shared by every run and audience, rebuilt when the
destination's limits or credentials change."""

import threading

import httpx

from sync.delivery import Sender
from sync.destinations.base import Destination


class Senders:
    def __init__(self, stopping: threading.Event, transport: httpx.BaseTransport | None = None) -> None:
        self.stopping = stopping  # set on a signal: every Sender cuts its waits short
        self.transport = transport  # None: the network (httpx.MockTransport in the in-process tests)
        self.by_destination: dict[int, tuple[object, Sender]] = {}
        self.retired: list[Sender] = []
        self.lock = threading.Lock()

    def get(self, destination: Destination) -> Sender:
        """The destination's Sender, rebuilt when its limits or credentials changed."""
        identity = (destination.limits, tuple(destination.secrets()))
        with self.lock:
            known = self.by_destination.get(destination.id)
            if known and known[0] == identity:
                return known[1]
            sender = Sender(destination, stopping=self.stopping, transport=self.transport)
            self.by_destination[destination.id] = (identity, sender)
            if known:  # another run may still be sending with it: closed with the others
                self.retired.append(known[1])
        return sender

    def close(self) -> None:
        for sender in [s for _, s in self.by_destination.values()] + self.retired:
            sender.close()
