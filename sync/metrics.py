"""Prometheus metrics of the daemon's connections and of requests to destinations; `/metrics` and `/healthz`.

A connection's series are labelled by what survives a rename: `audience` (the audience key) and
`destination_id`. `audience_sync_connection_info` carries the display names, for joins. The daemon describes
its connections at each reload (`describe`): a run of a connection it has not described (a one-shot
command's) is not observed, and one-shot commands serve nothing.
"""

import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Info, disable_created_metrics, make_wsgi_app

from sync import __version__
from sync.errors import ConfigError
from sync.models import Status

# a `_created` series beside each counter says nothing an operator needs
disable_created_metrics()  # type: ignore[no-untyped-call]
CONNECTION = ["audience", "destination_id"]
INFO = Gauge(
    "audience_sync_connection_info",
    "A connection's audience and destination names (always 1)",
    [*CONNECTION, "audience_name", "destination_name"],
)
RUNS = Counter("audience_sync_runs", "Connection runs by outcome", [*CONNECTION, "outcome"])
CHANGES = Counter("audience_sync_changes", "Changes by outcome", [*CONNECTION, "outcome"])
LAST_OUTCOME = Gauge(
    "audience_sync_last_run_outcome",
    "1, labelled with the outcome of the connection's last run",
    [*CONNECTION, "outcome"],
)
LAST_RUN = Gauge(
    "audience_sync_last_run_timestamp_seconds", "End of the connection's last run (unix time)", CONNECTION
)
LAST_SUCCESS = Gauge(
    "audience_sync_last_success_timestamp_seconds",
    "End of the connection's last ok run (unix time)",
    CONNECTION,
)
DURATION = Gauge(
    "audience_sync_last_run_duration_seconds", "Duration of the connection's last run", CONNECTION
)
PENDING = Gauge(
    "audience_sync_pending_changes", "Changes left pending by the connection's last run", CONNECTION
)
REJECTED = Gauge(
    "audience_sync_rejected_changes",
    "Changes the destination rejected in the connection's last run",
    CONNECTION,
)
MEMBERS = Gauge("audience_sync_members", "Members of the audience at the connection's last run", CONNECTION)
ACCEPTED = Gauge("audience_sync_accepted_members", "Members the destination has accepted", CONNECTION)
RECONCILED = Gauge(
    "audience_sync_reconciled_users",
    "Users by what the connection's last reconcile found at the destination (confirmed, drifted, missing, "
    "rejected, not_found; not_ours: the destination's records this product did not make)",
    [*CONNECTION, "outcome"],
)
VERIFIABLE = Gauge(
    "audience_sync_reconcile_verifiable",
    "1 when the connection's last reconcile could read the destination's records, 0 when it could not",
    CONNECTION,
)
PER_CONNECTION = (
    RUNS,
    CHANGES,
    LAST_OUTCOME,
    LAST_RUN,
    LAST_SUCCESS,
    DURATION,
    PENDING,
    REJECTED,
    MEMBERS,
    ACCEPTED,
    RECONCILED,
    VERIFIABLE,
)

REQUESTS = Counter(
    "audience_sync_http_requests",
    "Requests to a destination by status class of the answer (2xx ... 5xx; none: no answer)",
    ["destination_id", "status_class"],
)
RATE_LIMITED = Counter(
    "audience_sync_http_rate_limited", "Answers 429 (too many requests)", ["destination_id"]
)
RETRIES = Counter(
    "audience_sync_http_retries", "Requests sent again after a retriable failure", ["destination_id"]
)
Info("audience_sync_build", "The running audience-sync").info({"version": __version__})
HEALTHY = Gauge("audience_sync_healthy", "1 while /healthz answers 200, else 0")


@dataclass(frozen=True)
class Described:
    """A configured connection as the daemon's reload read it."""

    audience_id: int
    key: str
    audience_name: str
    destination_id: int
    destination_name: str


_lock = threading.Lock()
_names: dict[tuple[str, str], tuple[str, str]] = {}  # a described connection's labels -> its display names
_keys: dict[int, str] = {}  # audience id -> key, of the described connections


def describe(connections: Iterable[Described]) -> None:
    """Keep the series in step with the configured connections: a rename replaces the connection's info
    series; a connection gone loses all its series."""
    connections = list(connections)
    wanted = {(c.key, str(c.destination_id)): (c.audience_name, c.destination_name) for c in connections}
    keys = {c.audience_id: c.key for c in connections}
    with _lock:
        for labels, names in _names.items():
            if wanted.get(labels) != names:
                INFO.remove(*labels, *names)
            if labels not in wanted:
                for metric in PER_CONNECTION:
                    metric.remove_by_labels(dict(zip(CONNECTION, labels, strict=True)))
        for labels, names in wanted.items():
            INFO.labels(*labels, *names).set(1)
        _names.clear()
        _names.update(wanted)
        _keys.clear()
        _keys.update(keys)


def _labels(audience_id: int, destination_id: int) -> tuple[str, str] | None:
    """A described connection's labels; None for one the daemon has not described."""
    with _lock:
        key = _keys.get(audience_id)
        if key is None or (key, str(destination_id)) not in _names:
            return None
        return key, str(destination_id)


def _last_run(labels: tuple[str, str], outcome: str, finished: float, seconds: float) -> None:
    LAST_OUTCOME.remove_by_labels(dict(zip(CONNECTION, labels, strict=True)))
    LAST_OUTCOME.labels(*labels, outcome).set(1)
    LAST_RUN.labels(*labels).set(finished)
    DURATION.labels(*labels).set(seconds)


def observe_run(
    audience_id: int,
    destination_id: int,
    outcome: str,
    counts: dict[str, int],
    seconds: float,
    finished: float,
) -> None:
    """Record one connection's run."""
    labels = _labels(audience_id, destination_id)
    if labels is None:
        return
    RUNS.labels(*labels, outcome).inc()
    for status in (Status.ACCEPTED, Status.REJECTED, Status.SKIPPED, Status.FAILED):
        if counts.get(status):
            CHANGES.labels(*labels, status).inc(counts[status])
    _last_run(labels, outcome, finished, seconds)
    if outcome == "ok":
        LAST_SUCCESS.labels(*labels).set(finished)
    if "pending" in counts:  # not known when the query failed: the gauges keep the last counts
        PENDING.labels(*labels).set(counts["pending"])
    if "members" in counts:
        MEMBERS.labels(*labels).set(counts["members"])
    if Status.REJECTED in counts:
        REJECTED.labels(*labels).set(counts[Status.REJECTED])


def observe_reconcile(
    audience_id: int, destination_id: int, counts: dict[str, int], verifiable: bool
) -> None:
    """Record one connection's reconcile: what it found (kept from the last one it could read)."""
    labels = _labels(audience_id, destination_id)
    if labels is None:
        return
    VERIFIABLE.labels(*labels).set(1 if verifiable else 0)
    if verifiable:
        for outcome, users in counts.items():
            RECONCILED.labels(*labels, outcome).set(users)


def observe_audience_run(audience_id: int, outcome: str, finished: float) -> None:
    """Record a run of the audience as a whole (an invalid row or source, a state database lost before its
    connections ran) as the last run of each of its described connections."""
    for _, labels in _connections(audience_id):
        RUNS.labels(*labels, outcome).inc()
        _last_run(labels, outcome, finished, 0.0)


def _connections(audience_id: int | None) -> list[tuple[int, tuple[str, str]]]:
    """The described connections (of one audience, or of all): (audience id, labels) each."""
    with _lock:
        return [
            (audience, labels)
            for audience, key in _keys.items()
            for labels in _names
            if labels[0] == key and audience_id in (None, audience)
        ]


def accepted(members: dict[tuple[int, int], int], audience_id: int | None = None) -> None:
    """Set the accepted members of the described connections (of one audience, or of all) from `members`,
    by (audience id, destination id)."""
    for audience, labels in _connections(audience_id):
        ACCEPTED.labels(*labels).set(members.get((audience, int(labels[1])), 0))


def seed(last_runs: Iterable[Any]) -> None:
    """The gauges as the recorded runs left them (`history.last_runs`), so a restart does not empty them.
    In the order they were recorded: an audience's run (no destination) is the last run of its connections
    that have not run since."""
    for run in sorted(last_runs, key=lambda run: run.id):
        seconds = (run.finished_at - run.started_at).total_seconds()
        if run.destination_id is None:
            for _, of_audience in _connections(run.audience_id):
                _last_run(of_audience, run.outcome, run.finished_at.timestamp(), seconds)
            continue
        labels = _labels(run.audience_id, run.destination_id)
        if labels is None:
            continue
        _last_run(labels, run.outcome, run.finished_at.timestamp(), seconds)
        if run.pending is not None:
            PENDING.labels(*labels).set(run.pending)
        MEMBERS.labels(*labels).set(run.members)
        REJECTED.labels(*labels).set(run.rejected)
        if run.last_success is not None:
            LAST_SUCCESS.labels(*labels).set(run.last_success.timestamp())


def observe_request(destination_id: int, status: int | None) -> None:
    """One request to a destination, and the status of its answer (None: no answer)."""
    REQUESTS.labels(destination_id, "none" if status is None else f"{status // 100}xx").inc()
    if status == 429:
        RATE_LIMITED.labels(destination_id).inc()


class _IPv6Server(WSGIServer):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
        pass


def serve(address: str, port: int, health: Callable[[], str | None]) -> Callable[[], None]:
    """Serve /metrics and /healthz (200, or 503 with `health()`'s reason) on `address` and `port` in a thread;
    returns a function that stops it."""
    metrics_app = make_wsgi_app()
    HEALTHY.set_function(lambda: float(health() is None))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            problem = health()
            status = "200 OK" if problem is None else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{problem or 'ok'}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the daemon serves /metrics and /healthz\n"]

    server_class = _IPv6Server if ":" in address else WSGIServer
    try:
        server = make_server(address, port, app, server_class=server_class, handler_class=_Quiet)
    except OSError as exc:
        where = f"port {port}" if address == "127.0.0.1" else f"{address} port {port}"
        raise ConfigError(f"SYNC_METRICS_PORT: cannot listen on {where}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop
