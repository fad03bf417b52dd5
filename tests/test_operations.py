"""Operating it: structured logs, per-connection metrics, health, run history retention, deployment files."""

import contextlib
import dataclasses
import fnmatch
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client import REGISTRY

from sync import metrics
from sync.runner import Runner
from sync.sandbox import EverflowServer, RefersionServer
from sync.scheduler import Daemon
from sync.settings import Settings
from sync.sources import Sources
from sync.tables import sync_runs
from tests.conftest import Config, Customers, free_port, run_cli, start_cli, wait_for
from tests.test_e2e import everflow_destination, refersion_destination
from tests.test_reliability import _wait_for_metrics


def _two_destinations(config: Config, everflow: EverflowServer, refersion: RefersionServer) -> int:
    """An audience `VIP` connected to Everflow and Refersion; returns its id."""
    audience = config.audience("VIP", Customers.QUERY)
    config.connect(audience, everflow_destination(config, everflow))
    config.connect(audience, refersion_destination(config, refersion))
    return audience


def test_a_failed_run_logs_its_fields_and_reason_as_json_and_as_key_value_text(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        audience = _two_destinations(config, everflow, refersion)
        refersion.fault(401, body='{"error": "Invalid API credentials"}', times=100)
        done = run_cli(state_url, "run", env={"SYNC_LOG_FORMAT": "json"})
        assert done.returncode == 1, done.stderr
        # every log line is JSON; the command's summary lines after them are text
        records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        assert all(record["action"] for record in records)
        [failed] = [r for r in records if r["action"] == "run_finished" and r["destination"] == "Refersion"]
        assert failed["level"] == "ERROR"
        assert failed["outcome"] == "failed" and failed["reason"].startswith(
            "stopped: credentials refused (HTTP 401"
        )
        assert (failed["audience"], failed["audience_id"], failed["members"]) == ("VIP", audience, 2)
        assert failed["destination_id"] == int(
            config.sql("SELECT id FROM destinations WHERE name = 'Refersion'")[0][0]
        )
        [ok] = [r for r in records if r["action"] == "run_finished" and r["destination"] == "Everflow"]
        assert (ok["level"], ok["outcome"], ok["accepted"], ok["pending"]) == ("INFO", "ok", 2, 0)
        assert "reason" not in ok

        customers.add("u3")
        text = run_cli(state_url, "run")
        [line] = [x for x in text.stderr.splitlines() if "action=run_finished" in x and "=Refersion" in x]
        assert " ERROR " in line and " outcome=failed " in line and " audience=VIP " in line
        assert ' reason="stopped: credentials refused (HTTP 401' in line and " members=3 " in line


def test_a_held_and_an_invalid_connection_are_each_one_event_with_its_reason(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        config.connect(audience, refersion_destination(config, refersion), {"type": "banana"})
        assert run_cli(state_url, "run").returncode == 1
        config.sql("DELETE FROM customers")  # the query returns nobody: the Everflow connection is held
        done = run_cli(state_url, "run", env={"SYNC_LOG_FORMAT": "json"})
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    about = [
        (r["action"], r["level"], r.get("outcome"), r.get("destination")) for r in records if r.get("reason")
    ]
    assert about == [
        ("run_finished", "ERROR", "invalid", "Refersion"),
        ("run_finished", "WARNING", "held", "Everflow"),
    ], records
    [invalid, held] = [r["reason"] for r in records if r.get("reason")]
    assert "settings.type must be 'identify' or 'track', not 'banana'" in invalid
    assert held.startswith("held: the query returned no rows while 1 members are accepted")


def test_a_row_that_stays_invalid_is_logged_once_per_change_of_its_problem(
    state_url: str, engine: sa.Engine, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    config.audience("Broken", "SELECT 1", schedule="banana")
    daemon = Daemon(Runner(engine, Sources(engine), Settings.from_env()))
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            daemon.reload()
        config.sql("UPDATE audiences SET schedule = 'apple' WHERE name = 'Broken'")
        daemon.reload()
        daemon.reload()
    invalid = [r for r in caplog.records if getattr(r, "action", None) == "audience_invalid"]
    assert ["banana" in r.getMessage() for r in invalid] == [True, False]
    assert "apple" in invalid[1].getMessage() and invalid[1].reason == invalid[1].getMessage()


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


class Clock:
    """Time the test moves: the runs' `now` and the daemon's monotonic clock."""

    def __init__(self) -> None:
        self.at = datetime(2026, 12, 1, 9, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return self.at.timestamp()


@contextlib.contextmanager
def _daemon(engine: sa.Engine, clock: Clock) -> Iterator[Daemon]:
    """A daemon in this process, metrics on (not served), its scheduler not started."""
    settings = dataclasses.replace(Settings.from_env(), metrics_port=free_port())
    runner = Runner(engine, Sources(engine), settings, now=clock.now)
    try:
        yield Daemon(runner, clock=clock.monotonic)
    finally:
        runner.close()


def test_a_destination_that_keeps_failing_has_a_last_success_that_stops_advancing(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    clock = Clock()
    with contextlib.ExitStack() as stack:
        everflow = stack.enter_context(EverflowServer())
        refersion = stack.enter_context(RefersionServer())
        audience = _two_destinations(config, everflow, refersion)
        daemon = stack.enter_context(_daemon(engine, clock))
        daemon.reload()
        ids = dict(config.sql("SELECT name, id FROM destinations"))
        everflow_labels = {"audience": "vip", "destination_id": str(ids["Everflow"])}
        refersion_labels = {"audience": "vip", "destination_id": str(ids["Refersion"])}
        daemon.run_audience(audience)
        first = clock.monotonic()
        for labels in (everflow_labels, refersion_labels):
            assert _sample("audience_sync_last_success_timestamp_seconds", **labels) == first
            assert _sample("audience_sync_accepted_members", **labels) == 2
        requests = {
            status: _sample(
                "audience_sync_http_requests_total", destination_id=str(ids["Refersion"]), status_class=status
            )
            or 0
            for status in ("2xx", "4xx")
        }
        everflow_id = {"destination_id": str(ids["Everflow"])}
        before_429 = (
            _sample("audience_sync_http_rate_limited_total", **everflow_id) or 0,
            _sample("audience_sync_http_retries_total", **everflow_id) or 0,
        )

        refused = len(refersion.requests)
        refersion.fault(401, body='{"error": "Invalid API credentials"}', times=100)
        everflow.fault(429, headers={"Retry-After": "0"})
        for hours in (1, 2):
            customers.add(f"new{hours}")
            clock.at += timedelta(hours=1)
            daemon.run_audience(audience)
            assert (
                _sample("audience_sync_last_success_timestamp_seconds", **everflow_labels)
                == clock.monotonic()
            )
            assert _sample("audience_sync_last_success_timestamp_seconds", **refersion_labels) == first
            assert (
                _sample("audience_sync_last_run_timestamp_seconds", **refersion_labels) == clock.monotonic()
            )
            assert _sample("audience_sync_last_run_outcome", **refersion_labels, outcome="failed") == 1
            assert _sample("audience_sync_last_run_outcome", **refersion_labels, outcome="ok") is None
            assert _sample("audience_sync_pending_changes", **refersion_labels) == hours
        assert _sample("audience_sync_accepted_members", **everflow_labels) == 4
        assert _sample("audience_sync_accepted_members", **refersion_labels) == 2
        assert _sample("audience_sync_members", **refersion_labels) == 4
        refersion_id = str(ids["Refersion"])
        assert _sample(
            "audience_sync_http_requests_total", destination_id=refersion_id, status_class="4xx"
        ) == (requests["4xx"] + len(refersion.requests) - refused)
        assert (
            _sample("audience_sync_http_requests_total", destination_id=refersion_id, status_class="2xx")
            == (requests["2xx"])
        )
        assert (
            _sample("audience_sync_http_rate_limited_total", **everflow_id),
            _sample("audience_sync_http_retries_total", **everflow_id),
        ) == (before_429[0] + 1, before_429[1] + 1)


def test_a_renamed_audience_or_destination_changes_only_the_info_series(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    clock = Clock()
    with contextlib.ExitStack() as stack:
        everflow = stack.enter_context(EverflowServer())
        audience = config.audience("VIP", Customers.QUERY)
        destination = everflow_destination(config, everflow)
        config.connect(audience, destination)
        daemon = stack.enter_context(_daemon(engine, clock))
        daemon.reload()
        daemon.run_audience(audience)
        labels = {"audience": "vip", "destination_id": str(destination)}
        before = _series(labels)
        info = dict(labels, audience_name="VIP", destination_name="Everflow")
        assert before.pop(("audience_sync_connection_info", frozenset(info.items()))) == 1
        assert ("audience_sync_last_success_timestamp_seconds", frozenset(labels.items())) in before

        config.sql("UPDATE audiences SET name = 'Very Important People'")
        config.sql("UPDATE destinations SET name = 'Everflow EU'")
        daemon.reload()
        after = _series(labels)
        info = dict(labels, audience_name="Very Important People", destination_name="Everflow EU")
        assert after.pop(("audience_sync_connection_info", frozenset(info.items()))) == 1
        assert after == before  # the old info series is gone; every other series is as it was

        config.sql("DELETE FROM audience_destinations")
        daemon.reload()
        assert _series(labels) == {}  # a connection gone leaves no series


def _series(labels: dict[str, str]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every exposed series of the connection with these labels, and its value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if labels.items() <= sample.labels.items()
    }


def test_healthz_fails_when_the_scheduler_stopped_or_reloads_are_late_and_unknown_paths_are_404(
    engine: sa.Engine,
) -> None:
    clock = Clock()
    with _daemon(engine, clock) as daemon:
        port = daemon.runner.settings.metrics_port
        assert port is not None
        stop = metrics.serve("127.0.0.1", port, daemon.health)
        scheduler = threading.Thread(target=daemon.scheduler.start, daemon=True)
        try:

            def get(path: str) -> tuple[int, str]:
                answer = httpx.get(f"http://127.0.0.1:{port}{path}")
                return answer.status_code, answer.text

            daemon.reload()
            assert get("/healthz") == (503, "the scheduler is not running\n")
            scheduler.start()
            wait_for(lambda: daemon.scheduler.running, 10)
            assert get("/healthz") == (200, "ok\n")
            clock.at += timedelta(seconds=180)  # 3 x SYNC_RELOAD_INTERVAL (60s): still in time
            assert get("/healthz") == (200, "ok\n")
            clock.at += timedelta(seconds=1)
            assert get("/healthz") == (503, "no reload has read the configuration in the last 180s\n")
            daemon.reload()
            assert get("/healthz") == (200, "ok\n")
            daemon.scheduler.shutdown(wait=False)
            scheduler.join(10)
            assert get("/healthz") == (503, "the scheduler is not running\n")

            status, exposed = get("/metrics")
            assert status == 200 and 'audience_sync_build_info{version="' in exposed
            assert "\naudience_sync_healthy 0.0\n" in exposed  # what /healthz says, for the alert rules
            for path in ("/", "/foo", "/metrics/x", "/healthz/"):
                assert get(path) == (404, "not found: the daemon serves /metrics and /healthz\n")
        finally:
            stop()


def test_the_daemon_prunes_old_run_history_but_keeps_each_connections_last_and_last_ok_run(
    engine: sa.Engine, config: Config
) -> None:
    a = config.audience("A", "SELECT 1")
    b = config.audience("B", "SELECT 1")
    d1 = config.destination("D1", "everflow", {})
    d2 = config.destination("D2", "everflow", {})
    clock = Clock()
    runs = {  # name: (audience, destination, days before now, outcome)
        "a1 old ok": (a, d1, 200, "ok"),
        "a1 last ok": (a, d1, 150, "ok"),
        "a1 old failed": (a, d1, 120, "failed"),
        "a1 last": (a, d1, 100, "failed"),
        "a2 old ok": (a, d2, 100, "ok"),
        "a2 old failed": (a, d2, 95, "failed"),
        "a2 recent": (a, d2, 10, "ok"),
        "a old invalid": (a, None, 300, "invalid"),
        "a last invalid": (a, None, 200, "invalid"),
        "b1 old": (b, d1, 91, "ok"),
        "b1 within retention": (b, d1, 89, "ok"),
        "b1 last": (b, d1, 1, "held"),
    }
    with engine.begin() as conn:
        for name, (audience, destination, days, outcome) in runs.items():
            started = clock.now() - timedelta(days=days)
            row = {"audience_id": audience, "destination_id": destination, "outcome": outcome, "error": name}
            conn.execute(sa.insert(sync_runs), {**row, "started_at": started, "finished_at": started})
    with _daemon(engine, clock) as daemon:
        assert daemon.runner.settings.history_retention == 90 * 86400  # the default
        last = {"a1 last ok", "a1 last", "a2 recent", "a last invalid", "b1 within retention", "b1 last"}
        for later in (0, 365):  # a year on, the same rows: each is a last or a last ok run
            clock.at += timedelta(days=later)
            daemon.prune_history()
            assert {row.error for row in config.sql("SELECT error FROM sync_runs")} == last


@pytest.mark.parametrize(("text", "seconds"), [("12h", 43200), ("90d", 90 * 86400), ("1d12h", 129600)])
def test_history_retention_is_a_duration(monkeypatch: pytest.MonkeyPatch, text: str, seconds: float) -> None:
    monkeypatch.setenv("SYNC_HISTORY_RETENTION", text)
    assert Settings.from_env().history_retention == seconds


def test_a_bad_history_retention_stops_the_daemon_with_one_line(state_url: str) -> None:
    done = run_cli(state_url, "daemon", env={"SYNC_HISTORY_RETENTION": "forever"})
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("audience-sync: SYNC_HISTORY_RETENTION: 'forever' is not")
    )


DEPLOY = Path(__file__).parent.parent / "deploy"
METRIC = re.compile(r"\baudience_sync_\w+")


def _tool(name: str, *, in_ci: bool = False) -> str:
    """The path of a checking tool; skips without it, but fails under CI=true when `in_ci` (.ci/run installs
    it)."""
    path = shutil.which(name)
    if path is None:
        if in_ci and os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def _compose() -> list[str]:
    """The docker client's compose plugin, or the standalone docker-compose."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [_tool("docker-compose", in_ci=True)]


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = _tool("promtool", in_ci=True)
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_metric_the_alert_rules_and_the_dashboard_use_is_exported_by_a_running_daemon(
    state_url: str, config: Config, customers: Customers
) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = {
        panel["title"]: {name for target in panel["targets"] for name in METRIC.findall(target["expr"])}
        for panel in dashboard["panels"]
    }
    assert all(panels.values()), panels  # every panel shows at least one of ours
    rules = set(METRIC.findall((DEPLOY / "alerts.yml").read_text()))
    customers.add("u1")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        config.connect(audience, refersion_destination(config, refersion))  # reconcile reads its records
        everflow.fault(429, headers={"Retry-After": "0"})  # so that the 429 and retry counters have a series
        port = free_port()
        env = {"SYNC_INTERVAL": "1h", "SYNC_RECONCILE_INTERVAL": "1s", "SYNC_METRICS_PORT": str(port)}
        daemon = start_cli(state_url, "daemon", env=env)
        try:
            _wait_for_metrics(port, "audience_sync_runs_total{")
            exposed = _wait_for_metrics(port, "audience_sync_reconciled_users{")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=30)
    samples = {line.split("{")[0].split(" ")[0] for line in exposed.splitlines() if not line.startswith("#")}
    assert rules <= samples, rules - samples
    for title, names in panels.items():
        assert names <= samples, (title, names - samples)


def test_the_compose_file_parses_builds_both_services_and_keeps_the_password_out_of_urls(
    tmp_path: Path,
) -> None:
    """The docker client parses it (no Docker daemon runs here: the images are never built or started)."""
    command = _compose()
    (tmp_path / "deploy").mkdir()
    compose = tmp_path / "deploy" / "compose.yaml"
    shutil.copy(DEPLOY / "compose.yaml", compose)
    shutil.copy(DEPLOY / "audience-sync.env.example", tmp_path / "deploy" / "audience-sync.env")
    password = tmp_path / "deploy" / "postgres.env"
    password.write_text((DEPLOY / "postgres.env.example").read_text().replace("change-me", "s3cret-pw"))
    config = [*command, "--env-file", str(password), "-f", str(compose), "config"]
    done = subprocess.run(config, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]  # the migration is a service of its own
    assert services["daemon"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("migrate", "daemon"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile", name  # `up` builds what it runs
        environment = services[name]["environment"]
        assert environment["SYNC_DATABASE_URL"] == "postgresql://audience_sync@postgres:5432/audience_sync"
        assert environment["PGPASSWORD"] == "s3cret-pw", name  # libpq's: no URL holds it
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret-pw"
    assert not re.search(r"://[^\s@]*s3cret-pw", done.stdout)
    # a configuration problem (exit 2) stops `migrate`, which nothing restarts, and the daemon waits for it
    assert "restart" not in services["migrate"]
    assert services["daemon"]["restart"] == "unless-stopped"
    settings = [dict(services[name]["environment"], SYNC_METRICS_PORT="") for name in ("migrate", "daemon")]
    assert settings[0] == settings[1]  # what `migrate` accepts, the daemon starts with
    unset = subprocess.run(
        [*command, "-f", str(compose), "config"], capture_output=True, text=True, timeout=60
    )
    assert unset.returncode != 0 and "set POSTGRES_PASSWORD in deploy/postgres.env" in unset.stderr


def test_db_upgrade_reads_every_setting_so_compose_stops_a_bad_one_before_the_daemon(tmp_path: Path) -> None:
    """compose's `migrate` gates the daemon: a setting the daemon would refuse (exit 2, then a restart loop
    under its restart policy) is refused by `db upgrade` first, before anything is created."""
    state = tmp_path / "state.db"
    done = run_cli(f"sqlite:///{state}", "db", "upgrade", env={"SYNC_INTERVAL": "every few hours"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "audience-sync: SYNC_INTERVAL: 'every few hours' is not a duration (use e.g. 90s, 15m, 2h or 1h30m)"
    ]
    assert not state.exists()


def test_the_systemd_unit_verifies_as_shipped_and_rates_ok() -> None:
    """`systemd-analyze` reads it (systemd does not run here: the unit is never started)."""
    analyze = _tool("systemd-analyze")
    unit = DEPLOY / "audience-sync.service"
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert "EnvironmentFile=/etc/audience-sync/audience-sync.env" in unit.read_text()
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    exposure = re.search(r"Overall exposure level for audience-sync.service: ([\d.]+) (\w+)", security.stdout)
    assert exposure, security.stdout + security.stderr
    assert exposure[2] in ("OK", "SAFE"), exposure[0]


def test_the_dockerfile_runs_as_a_user_and_copies_what_the_package_needs() -> None:
    """No Docker daemon here: the image is never built; this reads the Dockerfile."""
    lines = [
        line.split() for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line and line[0] != "#"
    ]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    copied = {name for words in lines if words[0] == "COPY" for name in words[1:-1]}
    assert copied == {"deploy/requirements.lock", "pyproject.toml", "README.md", "sync", "migrations"}
    assert all((DEPLOY.parent / name).exists() for name in copied)
    assert ["RUN", "pip", "install", "--require-hashes", "-r", "requirements.lock"] in lines
    assert ["RUN", "pip", "install", "--no-deps", ".", "&&", "rm", "-rf", "/src"] in lines
    assert lines[-2:] == [
        ["ENTRYPOINT", '["audience-sync"]'],
        ["CMD", '["daemon"]'],
    ]  # `db upgrade`: its own run


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_local() -> None:
    """.dockerignore, read as Docker reads it (in order, the last match wins, `!` takes back, a directory
    matched takes its contents), over this checkout: its venv, caches and any state file stay out."""
    root = DEPLOY.parent
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in "#"
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            keep = pattern.startswith("!")
            pattern = pattern.removeprefix("!").rstrip("/")
            parts = path.split("/")
            if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
                verdict = not keep
        return verdict

    (root / "context-check.db").write_text("a state file left in the checkout")
    try:
        context = {
            str(path.relative_to(root))
            for path in root.rglob("*")
            if path.is_file() and not ignored(str(path.relative_to(root)))
        }
    finally:
        (root / "context-check.db").unlink()
    assert {"pyproject.toml", "README.md", "deploy/requirements.lock", "sync/cli.py"} <= context
    assert any(name.startswith("migrations/versions/") for name in context)
    assert not [
        name
        for name in context
        if name.split("/")[0] not in ("sync", "migrations", "deploy")
        and name not in ("pyproject.toml", "README.md")
    ]
    assert not [name for name in context if name.endswith((".db", ".pyc"))]


def test_the_lock_file_pins_every_dependency_of_pyproject_toml_with_hashes() -> None:
    """`make lock` writes deploy/requirements.lock from pyproject.toml; a dependency added or narrowed without
    running it fails here (the image would install something else than the package asks for)."""
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}  # name: version
    hashes: dict[str, int] = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if line[:1].isalnum():
            name, _, version = line.split(" ")[0].partition("==")
            name = name.lower().replace("_", "-")
            pins[name], hashes[name] = version, 0
        elif "--hash=sha256:" in line:
            hashes[name] += 1
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in deploy/requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name]), (
            f"{name}=={pins[name]} is not {requirement}: make lock"
        )
    assert pins and all(hashes.values()), hashes


def test_db_upgrade_runs_from_the_installed_package_without_the_source_tree(tmp_path: Path) -> None:
    """What the image does: the package built as a wheel and unpacked elsewhere (no alembic.ini, no migrations
    directory beside it); `db upgrade` then `db current` in an empty directory."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(wheels),
            ".",
        ],
        cwd=DEPLOY.parent,
        check=True,
        capture_output=True,
        timeout=120,
    )
    installed = tmp_path / "site"
    with zipfile.ZipFile(next(wheels.glob("audience_sync-*.whl"))) as wheel:
        wheel.extractall(installed)
    data = tmp_path / "data"
    data.mkdir()
    command = (
        f"import sys; sys.path.insert(0, {str(installed)!r}); import sync, sync.cli; "
        f"assert sync.__file__.startswith({str(installed)!r}), sync.__file__; sys.exit(sync.cli.main())"
    )
    env = {**os.environ, "SYNC_DATABASE_URL": f"sqlite:///{data / 'state.db'}"}
    for args in (["db", "upgrade"], ["db", "current"]):
        done = subprocess.run(
            [sys.executable, "-c", command, *args],
            cwd=data,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    assert "(head)" in done.stdout, done.stdout
    assert sorted(path.name for path in data.iterdir()) == ["state.db"]
