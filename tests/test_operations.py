"""Operating it: structured logs, per-connection metrics, health, run history retention, deployment files."""

import json
import logging

import pytest
import sqlalchemy as sa

from sync.runner import Runner
from sync.sandbox import EverflowServer, RefersionServer
from sync.scheduler import Daemon
from sync.settings import Settings
from tests.conftest import Config, Customers, run_cli
from tests.test_e2e import everflow_destination, refersion_destination


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


def test_a_row_that_stays_invalid_is_logged_once_per_change_of_its_problem(
    state_url: str, engine: sa.Engine, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    config.audience("Broken", "SELECT 1", schedule="banana")
    daemon = Daemon(Runner(engine, engine, Settings.from_env()))
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            daemon.reload()
        config.sql("UPDATE audiences SET schedule = 'apple' WHERE name = 'Broken'")
        daemon.reload()
        daemon.reload()
    invalid = [r for r in caplog.records if getattr(r, "action", None) == "audience_invalid"]
    assert ["banana" in r.getMessage() for r in invalid] == [True, False]
    assert "apple" in invalid[1].getMessage() and invalid[1].reason == invalid[1].getMessage()
