"""Runtime settings: the only module that reads the environment."""

import difflib
import ipaddress
import os
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from sync.errors import ConfigError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DAYS = 365  # longer is a typo; dates and timers past it overflow
SHORTEST_CADENCE = 1.0  # shorter is a typo (`1ms`), and runs would follow each other without a pause
SHORT_CADENCE = 60.0  # shorter is for tests and soaks: each run reads the whole audience
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# read by the test suite and the benchmarks (README.md, benchmarks/), not by the program
DEVELOPER_SETTINGS = (
    "SYNC_TEST_POSTGRES_URL",
    "SYNC_TEST_MARIADB_URL",
    "SYNC_BENCH_POSTGRES_URL",
    "SYNC_BENCH_MARIADB_URL",
)


def parse_duration(text: str, name: str) -> float:
    """Seconds in a duration like `90m`, `2h`, `1h30m` or `45s`."""
    compact = text.strip().replace(" ", "")
    if not compact or _PART.sub("", compact):
        raise ConfigError(f"{name}: {text!r} is not a duration (use e.g. 90s, 15m, 2h or 1h30m)")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(compact))
    if seconds <= 0:
        raise ConfigError(f"{name}: {text!r} must be longer than zero")
    if seconds > MAX_DAYS * _UNITS["d"]:
        raise ConfigError(f"{name}: {text!r} is longer than {MAX_DAYS} days")
    return seconds


@dataclass(frozen=True)
class Cadence:
    """How long to wait between two runs: fixed, or drawn uniformly from a range each time."""

    low: float
    high: float

    @classmethod
    def parse(cls, text: str, name: str) -> "Cadence":
        low, sep, high = text.partition("-")
        if sep:
            where = f"{name}: {text!r}"  # quote the range the operator wrote, not only the bad half
            bounds = cls(parse_duration(low, where), parse_duration(high, where))
            if bounds.low > bounds.high:
                raise ConfigError(f"{name}: {text!r} is a range whose start is after its end")
        else:
            seconds = parse_duration(text, name)
            bounds = cls(seconds, seconds)
        if bounds.low < SHORTEST_CADENCE:
            raise ConfigError(f"{name}: {text!r} is shorter than 1s, the shortest cadence")
        return bounds

    def draw(self, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(self.low, self.high)

    def warning(self, where: str) -> str | None:
        """What to say about a cadence under a minute: allowed, for tests and soaks, not for production."""
        if self.low >= SHORT_CADENCE:
            return None
        return f"{where}: cadence {self} is under a minute, for tests (each run reads the whole audience)"

    def __str__(self) -> str:
        return f"{self.low:g}s" if self.low == self.high else f"{self.low:g}s-{self.high:g}s"


@dataclass(frozen=True)
class Settings:
    database_url: str
    source_url: str | None
    interval: Cadence
    reload_interval: float
    query_timeout: float
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"  # where /metrics listens: loopback unless the operator opens it
    log_format: str = "text"
    pool_recycle: float = 180.0
    history_retention: float = 90 * 86400.0  # seconds of `sync_runs` the daemon keeps
    rejected_share: float = 0.5  # a run rejecting more of its changes than this is `rejected`, not `ok`
    reconcile_interval: float | None = 86400.0  # how often the daemon reconciles; None: never
    repair_share: float = 0.1  # a repair touching more of a connection's users than this is held
    reconcile_grace: float = 3600.0  # how long a postback may take to show in Everflow's report

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        return cls(
            database_url=env.get("SYNC_DATABASE_URL") or "sqlite:///audience-sync.db",
            source_url=env.get("SYNC_SOURCE_URL") or None,
            interval=Cadence.parse(env.get("SYNC_INTERVAL") or "2h-3h", "SYNC_INTERVAL"),
            reload_interval=parse_duration(env.get("SYNC_RELOAD_INTERVAL") or "60s", "SYNC_RELOAD_INTERVAL"),
            query_timeout=_query_timeout(env.get("SYNC_QUERY_TIMEOUT") or "10m"),
            metrics_port=_port(env.get("SYNC_METRICS_PORT")),
            metrics_address=_address(env.get("SYNC_METRICS_ADDRESS") or "127.0.0.1", "SYNC_METRICS_ADDRESS"),
            log_format=_choice(env.get("SYNC_LOG_FORMAT") or "text", "SYNC_LOG_FORMAT", ("text", "json")),
            pool_recycle=parse_duration(env.get("SYNC_POOL_RECYCLE") or "3m", "SYNC_POOL_RECYCLE"),
            history_retention=parse_duration(
                env.get("SYNC_HISTORY_RETENTION") or "90d", "SYNC_HISTORY_RETENTION"
            ),
            rejected_share=_share(env.get("SYNC_REJECTED_SHARE") or "50%", "SYNC_REJECTED_SHARE"),
            reconcile_interval=_interval_or_off(
                env.get("SYNC_RECONCILE_INTERVAL") or "24h", "SYNC_RECONCILE_INTERVAL"
            ),
            repair_share=_share(env.get("SYNC_REPAIR_SHARE") or "10%", "SYNC_REPAIR_SHARE"),
            reconcile_grace=parse_duration(env.get("SYNC_RECONCILE_GRACE") or "1h", "SYNC_RECONCILE_GRACE"),
        )


class _Asked(Mapping[str, str]):
    """An empty environment that notes each name read from it."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def unknown_settings() -> list[str]:
    """A line for each SYNC_* variable of the environment that looks like a misspelt setting (a typo is
    ignored otherwise), with the name it is close to. The names read are those `Settings.from_env` asks for,
    so a setting added there is known here. A name close to none is left alone: it may be a key or URL a
    row names in api_key_env or url_env."""
    asked = _Asked()
    Settings.from_env(asked)
    known = asked.names | set(DEVELOPER_SETTINGS)
    lines = []
    for name in sorted(n for n in os.environ if n.startswith("SYNC_") and n not in known):
        # compared without the prefix they all share
        close = difflib.get_close_matches(name[5:], sorted(k[5:] for k in known), n=1, cutoff=0.75)
        if close:
            lines.append(
                f"{name} is set, but audience-sync reads no such setting; did you mean SYNC_{close[0]}?"
            )
    return lines


def log_format_from_env() -> str:
    """SYNC_LOG_FORMAT alone, so that a bad value of another variable is reported in it."""
    return "json" if os.environ.get("SYNC_LOG_FORMAT") == "json" else "text"


def _query_timeout(text: str) -> float:
    """At least a millisecond and at most 24 days: Postgres's statement_timeout counts in int32 ms."""
    seconds = parse_duration(text, "SYNC_QUERY_TIMEOUT")
    if not 0.001 <= seconds <= 24 * _UNITS["d"]:
        raise ConfigError(f"SYNC_QUERY_TIMEOUT: {text!r} must be from 1ms to 24d")
    return seconds


def _share(text: str, name: str) -> float:
    """A percentage from 0% to 100% (`50%`), as a fraction."""
    match = _PERCENT.fullmatch(text.strip())
    if match is None or float(match[1]) > 100:
        raise ConfigError(f"{name}: {text!r} is not a percentage from 0% to 100% (e.g. 50%)")
    return float(match[1]) / 100


def _interval_or_off(text: str, name: str) -> float | None:
    """A duration of at least a second, or `0` for off."""
    if text.strip() == "0":
        return None
    seconds = parse_duration(text, name)
    if seconds < SHORTEST_CADENCE:
        raise ConfigError(f"{name}: {text!r} is shorter than 1s (0 turns it off)")
    return seconds


def _port(text: str | None) -> int | None:
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ConfigError(f"SYNC_METRICS_PORT: {text!r} is not a TCP port (1-65535)")
    return int(text)


def _address(text: str, name: str) -> str:
    """An IP address to listen on (`0.0.0.0` or `::` for every interface); host names are not looked up."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(
            f"{name}: {text!r} is not an IP address (127.0.0.1, the default, or 0.0.0.0 for every interface)"
        ) from None


def _choice(text: str, name: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise ConfigError(f"{name}: {text!r} is not one of {', '.join(choices)}")
    return text


def secret_from_env(variable: object, where: str, what: str) -> str:
    """The value of the environment variable that a row's `..._env` column (`where`: the row and the column)
    names, holding `what` ("the key", "the URL"), without the blanks around it (a newline from a file)."""
    value = (os.environ.get(env_name(variable, where, what)) or "").strip()
    if not value:
        raise ConfigError(f"{where} names {variable!r}, which is not set or empty")
    return value


def env_name(variable: object, where: str, what: str) -> str:
    """`variable`, checked to be an environment variable's name (not the secret itself, nor `$NAME`)."""
    if isinstance(variable, str) and variable.startswith("$") and ENV_NAME.fullmatch(variable[1:]):
        # not shown either: a secret may start with a $
        raise ConfigError(f"{where} starts with a $: drop it, the column holds the variable's name alone")
    if not (isinstance(variable, str) and ENV_NAME.fullmatch(variable)):
        # no part of it is shown: it is often the secret itself, pasted into the wrong column
        raise ConfigError(
            f"{where} does not hold an environment variable name; put {what} itself in the environment, not "
            "in this column"
        )
    return variable
