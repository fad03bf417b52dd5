"""Durations and cadences of SYNC_* variables."""

import random
import re

import pytest

from sync.errors import ConfigError
from sync.settings import Cadence, Settings, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90m", 5400),
        ("2h", 7200),
        ("45s", 45),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("1d", 86400),
        ("365d", 365 * 86400),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "X") == seconds


@pytest.mark.parametrize(
    "text", ["", "often", "10", "-5m", "-1h", "0s", "5 parsecs", "2h-", "366d", "99999999d", "1h-400d"]
)
def test_bad_durations_name_the_variable_and_quote_the_value(text: str) -> None:
    with pytest.raises(ConfigError, match=f"^SYNC_INTERVAL: {re.escape(repr(text))}"):
        Cadence.parse(text, "SYNC_INTERVAL")


def test_durations_longer_than_a_year_are_refused() -> None:
    # dates and timers overflow well before the largest number an operator can type
    with pytest.raises(ConfigError, match="^SYNC_RELOAD_INTERVAL: '99999999d' is longer than 365 days$"):
        parse_duration("99999999d", "SYNC_RELOAD_INTERVAL")


def test_cadence_range_draws_uniformly_within_bounds() -> None:
    cadence = Cadence.parse("2h-3h", "SYNC_INTERVAL")
    draws = [cadence.draw(random.Random(seed)) for seed in range(200)]
    assert all(7200 <= d <= 10800 for d in draws)
    assert min(draws) < 7500 and max(draws) > 10500
    assert Cadence.parse("90m", "SYNC_INTERVAL").draw() == 5400
    with pytest.raises(ConfigError, match="start is after its end"):
        Cadence.parse("3h-2h", "SYNC_INTERVAL")


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SYNC_DATABASE_URL",
        "SYNC_SOURCE_URL",
        "SYNC_INTERVAL",
        "SYNC_RELOAD_INTERVAL",
        "SYNC_QUERY_TIMEOUT",
        "SYNC_POOL_RECYCLE",
    ):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings.from_env()
    assert defaults.database_url == "sqlite:///audience-sync.db"
    assert defaults.source_url is None
    assert defaults.interval == Cadence(7200, 10800)
    assert (defaults.reload_interval, defaults.query_timeout, defaults.pool_recycle) == (60, 600, 180)
    monkeypatch.setenv("SYNC_QUERY_TIMEOUT", "30s")
    monkeypatch.setenv("SYNC_INTERVAL", "5m")
    monkeypatch.setenv("SYNC_POOL_RECYCLE", "5s")
    configured = Settings.from_env()
    assert configured.query_timeout == 30 and configured.interval == Cadence(300, 300)
    assert configured.pool_recycle == 5


@pytest.mark.parametrize("port", ["²", "٨٠٨٠", "0", "65536", "80a"])
def test_metrics_port_must_be_ascii_digits_of_a_tcp_port(monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    monkeypatch.setenv("SYNC_METRICS_PORT", port)
    with pytest.raises(ConfigError, match=f"^SYNC_METRICS_PORT: {port!r} is not a TCP port"):
        Settings.from_env()


@pytest.mark.parametrize("timeout", ["0.5ms", "25d"])
def test_query_timeout_fits_postgres_statement_timeout(monkeypatch: pytest.MonkeyPatch, timeout: str) -> None:
    # statement_timeout counts whole milliseconds in 32 bits: 0.5ms would become 0 (no timeout at all)
    monkeypatch.setenv("SYNC_QUERY_TIMEOUT", timeout)
    with pytest.raises(ConfigError, match=f"^SYNC_QUERY_TIMEOUT: {timeout!r} must be from 1ms to 24d$"):
        Settings.from_env()
