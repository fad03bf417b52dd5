"""Names given on the command line (`--audience`, `--destination`), matched to the configuration rows."""

import difflib

import sqlalchemy as sa

from sync.errors import ConfigError
from sync.tables import audiences, destinations

TABLES = {"audience": audiences, "destination": destinations}


def resolve(conn: sa.Connection, what: str, given: list[str]) -> list[str]:
    """The rows' names for the names given: each exactly, else case-insensitively when that is unique.

    Raises ConfigError (exit 2) listing the candidates when a name matches several rows but for case, and
    the closest names when it matches none.
    """
    table = TABLES[what]
    names = [str(name) for name in conn.scalars(sa.select(table.c.name).order_by(table.c.name))]
    return [match(name, names, what) for name in given]


def match(given: str, names: list[str], what: str) -> str:
    if given in names:
        return given
    but_case = [name for name in names if name.casefold() == given.casefold()]
    if len(but_case) == 1:
        return but_case[0]
    if but_case:
        raise ConfigError(
            f"--{what} {given!r} matches {_quoted(but_case)} but for case; give one of them exactly"
        )
    by_folded: dict[str, list[str]] = {}
    for name in names:
        by_folded.setdefault(name.casefold(), []).append(name)
    # the names that contain what was given, else the closest by difflib's ratio
    close = [name for name in by_folded if given.casefold() in name][:3]
    close = close or difflib.get_close_matches(given.casefold(), list(by_folded), n=3, cutoff=0.6)
    hint = f"; did you mean {_quoted([n for f in close for n in by_folded[f]])}?" if close else ""
    raise ConfigError(f"no {what} named {given!r}{hint or f'; `audience-sync {what}s` lists them'}")


def _quoted(names: list[str]) -> str:
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
