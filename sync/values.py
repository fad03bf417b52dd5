"""One form for the values a query returns: a user id as text, a trait as JSON (README "How values are sent").

These are the rules; where a database builds the same text in SQL for speed (sync.traits, the in-place
staging in sync.staging), tests/test_values.py proves it equal to them on that engine.

- text: itself (a `char(n)` without its padding, as SQL's CAST to text writes it)
- integers and exact numerics: a JSON number with the stored digits (never through a float)
- floats: the shortest text that reads back to the same value at the column's own precision, written as
  Postgres writes it (`1`, `0.1`, `1e+15`, `1e-05`: an exponent below -4 or from 15 on, 6 for a float4);
  -0 is 0
- booleans: true / false
- dates `2024-01-31`; times and timestamps ISO 8601 with a `T`, fractions without trailing zeros, a time
  zone as UTC with `Z`
- intervals: ISO 8601 durations (`P1DT2H3M4.5S`)
- UUIDs: their text; bytes: base64
- JSON: the value itself (an object, an array...), from a column whose type says JSON
- NaN and infinities: null (JSON has none), so also no user id

A user id is the trait's text, without the quotes of a JSON string.
"""

import base64
import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, NamedTuple


class Kind(NamedTuple):
    """What a column's type says beyond the driver's Python value."""

    single: bool = False  # a 4-byte float (the driver widened it to a double)
    padded: bool = False  # char(n): the driver kept the padding
    json_text: bool = False  # JSON the driver returns as text


PLAIN = Kind()


def float_text(value: float, single: bool = False) -> str | None:
    """The shortest text reading back to `value` (at single precision when `single`); None for NaN, ±inf."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return "0"
    if single:
        value = _as_single(value)  # a driver may hand it over as the double nearest the text it read
        if not math.isfinite(value):
            return None
        text = next(t for p in range(1, 10) if _as_single(float(t := f"{value:.{p - 1}e}")) == value)
    else:
        text = repr(value)
    sign, digits, exponent = Decimal(text).normalize().as_tuple()
    assert isinstance(exponent, int)
    shown = "".join(map(str, digits))
    power = exponent + len(shown) - 1
    if power < -4 or power >= (6 if single else 15):
        mantissa = shown[0] + ("." + shown[1:] if len(shown) > 1 else "")
        return f"{'-' if sign else ''}{mantissa}e{'-' if power < 0 else '+'}{abs(power):02d}"
    return format(Decimal(text).normalize(), "f")


def _as_single(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]  # type: ignore[no-any-return]
    except OverflowError:
        return math.inf


def decimal_text(value: Decimal) -> str | None:
    """Every stored digit, positional; None for NaN and infinities."""
    return format(value, "f") if value.is_finite() else None


def time_text(value: datetime | time) -> str:
    """ISO 8601 with a `T`, the fraction without trailing zeros, an aware value as UTC with `Z`."""
    zone = ""
    if value.tzinfo is not None and value.utcoffset() is not None:
        if isinstance(value, datetime):
            value = value.astimezone(UTC).replace(tzinfo=None)
        else:
            offset = value.utcoffset() or timedelta()
            moved = datetime.combine(date(2000, 1, 1), value.replace(tzinfo=None)) - offset
            value = moved.time()
        zone = "Z"
    text = value.isoformat()
    if value.microsecond:
        text = text.rstrip("0")
    return text + zone


def interval_text(value: timedelta) -> str:
    """An ISO 8601 duration: P{days}DT{h}H{m}M{s}S, zero parts left out (PT0S for none)."""
    sign = "-" if value < timedelta() else ""
    value = abs(value)
    hours, rest = divmod(value.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    second = f"{seconds}.{value.microseconds:06d}".rstrip("0") if value.microseconds else str(seconds)
    parts = [
        f"{hours}H" if hours else "",
        f"{minutes}M" if minutes else "",
        f"{second}S" if second != "0" else "",
    ]
    clock = "".join(parts)
    days = f"{value.days}D" if value.days else ""
    text = "P" + days + ("T" + clock if clock else "")
    return sign + (text if text != "P" else "PT0S")


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _number(text: str | None) -> str:
    return "null" if text is None else text


def _nested(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)


def json_value(value: Any, kind: Kind = PLAIN) -> str:
    """The trait's JSON text."""
    if value is None:
        return "null"
    writer = WRITERS.get(type(value))
    if writer is not None:
        return writer(value, kind)
    for cls, writer in WRITERS.items():
        if isinstance(value, cls):
            return writer(value, kind)
    return _quoted(str(value))


def _text(value: str, kind: Kind) -> str:
    if kind.json_text:
        try:
            return _json(json.loads(value), kind)
        except ValueError:  # a JSON type holding no JSON: its text
            pass
    return _quoted(value.rstrip(" ") if kind.padded else value)


def _json(value: Any, _kind: Kind) -> str:
    try:
        return _nested(value)
    except ValueError:  # NaN or an infinity inside
        return _nested(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


WRITERS: dict[type, Callable[[Any, Kind], str]] = {
    str: _text,
    bool: lambda v, _: "true" if v else "false",
    int: lambda v, _: str(v),
    float: lambda v, k: _number(float_text(v, k.single)),
    Decimal: lambda v, _: _number(decimal_text(v)),
    datetime: lambda v, _: _quoted(time_text(v)),
    date: lambda v, _: _quoted(v.isoformat()),
    time: lambda v, _: _quoted(time_text(v)),
    timedelta: lambda v, _: _quoted(interval_text(v)),
    uuid.UUID: lambda v, _: _quoted(str(v)),
    bytes: lambda v, _: _quoted(base64.b64encode(v).decode()),
    bytearray: lambda v, _: _quoted(base64.b64encode(v).decode()),
    memoryview: lambda v, _: _quoted(base64.b64encode(v).decode()),
    dict: _json,
    list: _json,
}


def user_id_text(value: Any, kind: Kind = PLAIN) -> str | None:
    """The user id: the trait's text without a JSON string's quotes; None for none (NULL, '', NaN)."""
    if isinstance(value, str) and not kind.json_text:
        text = value.rstrip(" ") if kind.padded else value
    else:
        written = json_value(value, kind)
        text = "" if written == "null" else json.loads(written) if written.startswith('"') else written
    return text or None


def traits_text(names: Sequence[str], kinds: Sequence[Kind], row: Sequence[Any]) -> str:
    """The traits object: `{"a":1,"b":"x"}`, the query's columns in its order, the user id left out."""
    parts = [
        f"{_quoted(name)}:{json_value(value, kind)}"
        for name, kind, value in zip(names, kinds, row, strict=True)
        if name != "user_id"
    ]
    return "{" + ",".join(parts) + "}"


def json_number(text: str) -> float | Decimal:
    """A JSON number read from stored traits: a float where it carries the text's digits, else a Decimal (a
    numeric's 38 digits, 12.50), so that what is sent has the digits that were stored."""
    value = float(text)
    return value if float_text(value) == text or repr(value) == text else Decimal(text)


# A Decimal is written as a JSON number by way of a string the encoder writes whole, then unquoted: a
# private-use character that no trait is expected to hold marks it
_MARK = "\ue000"
_MARKED = re.compile(f'"{_MARK}([-+.0-9Ee]+){_MARK}"')


def dumps(value: Any) -> str:
    """JSON of a message: Decimals as numbers with their digits; NaN and infinities refused (ValueError)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_marked)
    return _MARKED.sub(r"\1", text) if _MARK in text else text


def _marked(value: Any) -> str:
    if isinstance(value, Decimal) and value.is_finite():
        return f"{_MARK}{value}{_MARK}"
    raise TypeError(f"{type(value).__name__} is not JSON")
