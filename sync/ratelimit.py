"""Pacing the requests to one destination, retrying them, and the stop that cuts short every wait."""

import threading
import time
from collections.abc import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from sync.errors import RetriableError

RETRY_AFTER_CAP = 60.0


class Interrupted(Exception):
    """The process is stopping (SIGTERM, SIGINT): a request not sent yet is not sent, a wait ends now."""


class RateLimiter:
    """Spaces requests evenly, 1% under `rate` per second, across every thread sending to one destination.

    The 1% absorbs network jitter: requests spaced exactly 1/rate apart can arrive closer together, and a
    destination counting strictly would then see more than `rate` in a second.
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        stopping: threading.Event | None = None,
    ) -> None:
        self.interval = 1.0 / (rate * 0.99)
        self.clock = clock
        self.stopping = stopping or threading.Event()
        self.next_slot = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        """Wait for this request's slot; raises Interrupted when the process stops meanwhile (or had)."""
        with self.lock:
            now = self.clock()
            slot = max(now, self.next_slot)
            self.next_slot = slot + self.interval
        if self.stopping.wait(max(0.0, slot - now)):
            raise Interrupted

    def pause(self, seconds: float) -> None:
        """Hold every sender back, as when the destination answered 429 with Retry-After."""
        with self.lock:
            self.next_slot = max(self.next_slot, self.clock() + seconds)


def retrying(
    attempts: int, backoff_initial: float, backoff_max: float, sleep: Callable[[float], None]
) -> Retrying:
    """Up to `attempts` tries of what raises RetriableError: the next after its Retry-After (at most
    RETRY_AFTER_CAP), else after a random exponential backoff; the last error is raised."""

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetriableError) and error.retry_after is not None:
            return min(error.retry_after, RETRY_AFTER_CAP)
        return float(wait_random_exponential(multiplier=backoff_initial, max=backoff_max)(state))

    return Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait,
        retry=retry_if_exception_type(RetriableError),
        sleep=sleep,
        reraise=True,
    )
