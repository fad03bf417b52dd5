"""Prometheus metrics of runs and changes, and the daemon's `/metrics` and `/healthz` endpoint."""

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from sync.errors import ConfigError
from sync.models import Status

RUNS = Counter("audience_sync_runs", "Connection runs by outcome", ["audience", "destination", "outcome"])
CHANGES = Counter("audience_sync_changes", "Changes by outcome", ["audience", "destination", "outcome"])
DURATION = Histogram(
    "audience_sync_run_duration_seconds",
    "Duration of a connection's run",
    ["audience"],
    buckets=(1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
)
LAST_SUCCESS = Gauge("audience_sync_last_success_timestamp_seconds", "Last ok run (unix time)", ["audience"])
PENDING = Gauge(
    "audience_sync_pending_changes", "Changes left pending after the last run", ["audience", "destination"]
)


def observe_run(
    audience: str,
    destination: str | None,
    outcome: str,
    counts: dict[str, int],
    seconds: float,
    finished: float,
) -> None:
    """Record one connection's run."""
    destination = destination or ""
    RUNS.labels(audience, destination, outcome).inc()
    DURATION.labels(audience).observe(seconds)
    for status in (Status.ACCEPTED, Status.REJECTED, Status.SKIPPED, Status.FAILED):
        if counts.get(status):
            CHANGES.labels(audience, destination, status).inc(counts[status])
    if outcome == "ok":
        LAST_SUCCESS.labels(audience).set(finished)
    if "pending" in counts:  # not known when the query failed: the gauge keeps the last count
        PENDING.labels(audience, destination).set(counts["pending"])


def seed(last_runs: Iterable[Any]) -> None:
    """The gauges as the recorded runs left them (`state.last_runs`), so a restart does not empty them."""
    for run in last_runs:
        audience = str(run.audience)
        if run.pending is not None:
            PENDING.labels(audience, run.destination or "").set(run.pending)
        if run.last_success is not None:
            LAST_SUCCESS.labels(audience).set(run.last_success.timestamp())


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
        pass


def serve(port: int, healthy: Callable[[], bool]) -> Callable[[], None]:
    """Serve /metrics and /healthz on `port` in a thread; returns a function that stops it."""
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"state database unreachable\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    try:
        server = make_server("", port, app, handler_class=_Quiet)
    except OSError as exc:
        raise ConfigError(f"SYNC_METRICS_PORT: cannot listen on port {port}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop
