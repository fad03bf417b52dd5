"""Soak: the daemon with many audiences at a seconds-scale cadence, random churn and random faults.

    .venv/bin/python benchmarks/soak.py --seconds 120 [--audiences 50] [--backend sqlite|postgres]

Faults: 5% of requests answer 503, and about two seconds in five queue one of: a dropped connection, a 429
with Retry-After, a request accepted whose answer never arrives (the daemon cannot know it was accepted), or
such a request followed by 503s for the next requests, its retries among them (an entry left in doubt). A
user whose entry was accepted unanswered then leaves the audience, before the next run when the daemon is
not faster: the exit must still be sent.
Reports cycles run, overlapping runs of one audience (must be 0), changes lost (must be 0), duplicate
deliveries (same messageId accepted twice: must not exceed the requests accepted but never answered), the
daemon's peak RSS (VmHWM) after start-up and at the end, and its RSS every 30 s.
After 3 minutes of warm-up, the median RSS of the last quarter of the run must not exceed that of the first
quarter by more than 2% (must not grow); runs shorter than 7 minutes are too short to judge it.
Exits 1 when a "must" fails. Every request goes to loopback servers this script starts; it stops by itself.
"""

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sync import database
from sync.sandbox import SegmentServer
from sync.tables import sync_runs

COMMAND = str(Path(sys.executable).with_name("audience-sync"))
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WARM_UP = 6  # samples (of 30 s) before the daemon's RSS is taken as steady
RSS_TOLERANCE = 1.02  # the last quarter's median RSS over the first's


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """The process's resident set (or its peak, VmHWM) in KiB; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--audiences", type=int, default=50)
    parser.add_argument("--users", type=int, default=40, help="users in the source table")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    rng = random.Random(7)

    admin = None
    if args.backend == "sqlite":
        url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'soak.db'}"
    else:
        name = f"soak_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = sa.make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    database.upgrade(url)
    engine = database.create_engine(url)

    with SegmentServer(api_key="soak", fail_ratio=0.05, delay=0.005) as server:
        result = soak(args, url, engine, server, rng)
    engine.dispose()
    if admin is not None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{sa.make_url(url).database}" WITH (FORCE)')
    return result


def soak(
    args: argparse.Namespace, url: str, engine: sa.Engine, server: SegmentServer, rng: random.Random
) -> int:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE memberships (audience_no INTEGER, user_id TEXT, email TEXT)")
        conn.execute(
            sa.text(
                "INSERT INTO destinations (name, kind, api_key, settings) VALUES "
                "('Sink', 'everflow', 'soak', :s)"
            ),
            # 3 attempts: an entry accepted unanswered has its retries refused by the 503s queued after it
            {
                "s": json.dumps(
                    {
                        "transport": "segment",
                        "endpoint": server.url,
                        "backoff_initial": 0.05,
                        "max_attempts": 3,
                    }
                )
            },
        )
        for n in range(args.audiences):
            conn.execute(
                sa.text("INSERT INTO audiences (name, query) VALUES (:name, :query)"),
                {
                    "name": f"Soak {n}",
                    "query": "SELECT user_id, email, user_id AS transaction_id FROM memberships "
                    f"WHERE audience_no = {n}",
                },
            )
        conn.exec_driver_sql(
            "INSERT INTO audience_destinations (audience_id, destination_id) "
            "SELECT id, (SELECT id FROM destinations) FROM audiences"
        )
        conn.execute(
            sa.text("INSERT INTO memberships VALUES (:a, :u, :e)"),
            [
                {"a": n, "u": f"u{i}", "e": f"u{i}@example.com"}
                for n in range(args.audiences)
                for i in range(args.users)
                if rng.random() < 0.5
            ],
        )

    env = {"SYNC_DATABASE_URL": url, "SYNC_INTERVAL": "2s-4s", "SYNC_RELOAD_INTERVAL": "2s", "PATH": ""}
    log = tempfile.NamedTemporaryFile(prefix="soak-daemon-", suffix=".log", delete=False)  # noqa: SIM115
    daemon = subprocess.Popen(
        [COMMAND, "daemon"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )
    time.sleep(min(10.0, args.seconds / 4))
    peak_start = rss_kib(daemon.pid, "VmHWM")
    samples: list[int] = []  # the daemon's RSS every 30 s: warm-up or steady growth
    deadline = time.monotonic() + args.seconds
    left = 0  # unanswered requests looked at
    while time.monotonic() < deadline and daemon.poll() is None:  # churn and faults, every second
        fault = rng.randrange(10)
        if fault == 0:
            server.reset_connection()
        elif fault == 1:
            server.fault(429, headers={"Retry-After": "1"})
        elif fault == 2:
            server.accept_then()
        elif fault == 3:  # the destination took it, the daemon cannot know, and then refuses the retries
            server.accept_then()
            server.fault(503, times=4)
        if len(samples) * 30 <= args.seconds - (deadline - time.monotonic()):
            samples.append(rss_kib(daemon.pid))
            print(f"{len(samples) / 2 - 0.5:6.1f} min  RSS {samples[-1] / 1024:.1f} MiB", flush=True)
        with engine.begin() as conn:
            left += leave_after_unanswered_entries(conn, server, left)
            for _ in range(5):
                n, user = rng.randrange(args.audiences), f"u{rng.randrange(args.users)}"
                gone = conn.execute(
                    sa.text("DELETE FROM memberships WHERE audience_no = :a AND user_id = :u"),
                    {"a": n, "u": user},
                ).rowcount
                if not gone:
                    conn.execute(
                        sa.text("INSERT INTO memberships VALUES (:a, :u, :e)"),
                        {"a": n, "u": user, "e": f"{user}@example.com"},
                    )
        time.sleep(1)
    server.fail_ratio = 0
    server.clear_faults()
    settled = settle(engine, args.audiences)
    print(f"settled: every audience ran ok after the last fault: {settled}")
    peak_end = rss_kib(daemon.pid, "VmHWM")
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=120)
    log.close()
    if daemon.returncode != 0:
        tail = Path(log.name).read_text().splitlines()[-20:]
        print(f"the daemon exited {daemon.returncode}; the end of its log ({log.name}):", *tail, sep="\n")
    else:
        Path(log.name).unlink()

    with engine.connect() as conn:
        runs = conn.execute(
            sa.text(
                "SELECT audience_id, started_at, finished_at FROM sync_runs ORDER BY audience_id, started_at"
            )
        ).all()
        keys: dict[int, str] = dict(conn.execute(sa.text("SELECT id, key FROM audiences")).all())
        wanted = {
            (f"soak_{a}", u) for a, u in conn.execute(sa.text("SELECT audience_no, user_id FROM memberships"))
        }
    overlaps = sum(1 for a, b in zip(runs, runs[1:], strict=False) if a[0] == b[0] and b[1] < a[2])
    final: dict[tuple[str, str], bool] = {}
    for message in server.messages:  # the destination's view, in the order it accepted them
        final[(message["context"]["personas"]["computation_key"], message["userId"])] = value(message)
    members_there = {k for k, entered in final.items() if entered}
    lost = len(wanted ^ members_there)
    for key, user in sorted(wanted ^ members_there)[:10]:  # what to look at when one is lost
        sent = [
            (value(m), m["messageId"])
            for m in server.messages
            if m["userId"] == user and key in m["properties"]
        ]
        print(f"lost: {key} {user}: member now {(key, user) in wanted}; accepted by the sink {sent}")
    accepted = Counter(m["messageId"] for m in server.messages)
    duplicates = sum(n - 1 for n in accepted.values())
    print(f"audiences {len(keys)}  cycles (connection runs) {len(runs)}  messages {len(server.messages)}")
    print(f"overlaps {overlaps} (must be 0)  lost {lost} (must be 0)")
    unanswered = len(server.unanswered)  # each of these requests may have been accepted twice
    print(f"duplicates {duplicates} (must be at most the {unanswered} requests accepted but never answered)")
    entries = [r.json for r in server.unanswered if value(r.json)]
    in_doubt = sum(1 for m in entries if accepted[m["messageId"]] == 1)
    print(
        f"entries accepted unanswered {len(entries)}, {in_doubt} of them never accepted again (left in doubt)"
    )
    print(
        f"daemon peak RSS (VmHWM) after start-up {peak_start / 1024:.1f} MiB, at the end "
        f"{peak_end / 1024:.1f} MiB; exit {daemon.returncode}"
    )
    rss_grew = rss_growth(samples)
    musts = (overlaps == 0, lost == 0, duplicates <= unanswered, not rss_grew, daemon.returncode == 0)
    return 0 if all(musts) else 1


def settle(engine: sa.Engine, audiences: int, timeout: float = 120) -> bool:
    """Wait until every audience has a run that started now or later and ended ok: what the last faults
    left pending is delivered (a machine under load may need several cycles). Whether it happened."""
    since = datetime.now(UTC)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            ok = conn.scalar(
                sa.select(sa.func.count(sa.distinct(sync_runs.c.audience_id))).where(
                    sync_runs.c.outcome == "ok", sync_runs.c.started_at > since
                )
            )
        if ok == audiences:
            return True
        time.sleep(2)
    return False


def value(message: dict[str, Any]) -> bool:
    """The membership a message carries (Everflow over Segment: a track call's property)."""
    return bool(message["properties"][message["context"]["personas"]["computation_key"]])


def leave_after_unanswered_entries(conn: sa.Connection, server: SegmentServer, seen: int) -> int:
    """Each user whose entry was accepted unanswered since the `seen` first such requests leaves its
    audience; how many requests were looked at."""
    requests = server.unanswered[seen:]
    for request in requests:
        if value(request.json):  # an entry
            key = request.json["context"]["personas"]["computation_key"]
            conn.execute(
                sa.text("DELETE FROM memberships WHERE audience_no = :a AND user_id = :u"),
                {"a": int(key.removeprefix("soak_")), "u": request.json["userId"]},
            )
    return len(requests)


def rss_growth(samples: list[int]) -> bool:
    """Print the RSS of the first and last quarter after warm-up; whether it grew past the tolerance."""
    steady = samples[WARM_UP:]
    if len(steady) < 8:
        print(f"RSS: {len(samples)} samples, too few after the warm-up ({WARM_UP * 30} s) to judge growth")
        return False
    quarter = len(steady) // 4
    first, last = steady[:quarter], steady[-quarter:]
    grew = statistics.median(last) > statistics.median(first) * RSS_TOLERANCE
    for name, window in (("first", first), ("last", last)):
        print(
            f"RSS {name} quarter after warm-up: median {statistics.median(window) / 1024:.1f} MiB"
            f"  peak {max(window) / 1024:.1f} MiB"
        )
    print(f"RSS {'grew' if grew else 'did not grow'} (must not grow by more than {RSS_TOLERANCE - 1:.0%})")
    return grew


if __name__ == "__main__":
    raise SystemExit(main())
