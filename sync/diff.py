"""The diff of a connection in a run: what to send, as set-based SQL.

Anti-joins between the run's staged members (`sync_stage_members`, a temporary table of the connection that
staged them) and `sync_state`, written once per connection and run into another temporary table
(`sync_stage_diff`) and read from it in keyset pages, so memory does not grow with the audience.

Transactions: every read and write goes through `SharedReads` turns, which end their transactions.
"""

import re
import sqlite3
from collections.abc import Iterator
from typing import Any, NamedTuple

import sqlalchemy as sa

from sync.errors import SourceError
from sync.models import Change
from sync.staging import SharedReads
from sync.tables import sync_stage, sync_stage_diff

_ENTRIES = f"""
    FROM {sync_stage.name} m
    LEFT JOIN sync_state s
      ON s.audience_id = :audience_id AND s.destination_id = :destination_id AND s.user_id = m.user_id
    WHERE (s.user_id IS NULL OR s.member = false OR s.in_doubt_since IS NOT NULL)
      AND NOT EXISTS (
        SELECT 1 FROM sync_rejections r
        WHERE r.audience_id = :audience_id AND r.destination_id = :destination_id
          AND r.user_id = m.user_id AND r.value = true AND r.traits = m.traits)
"""


_EXITS = f"""
    FROM sync_state s
    WHERE s.audience_id = :audience_id AND s.destination_id = :destination_id
      AND (s.member = true OR s.in_doubt_since IS NOT NULL)
      AND NOT EXISTS (SELECT 1 FROM {sync_stage.name} m WHERE m.user_id = s.user_id)
"""


# What a change carries of the state. A user in doubt: a change may have reached the destination unanswered,
# so what the state says of it (a Refersion affiliate's numeric id, whether it is active) may be stale. The
# change carries no numeric id, so the destination looks the user up (by code or email) and reads its status;
# an entry takes it as not active and an exit as active, and the status read decides what is left to change.
_IN_DOUBT = "s.in_doubt_since IS NOT NULL"
_ENTRY_REMOTE = (
    f"s.changes, CASE WHEN {_IN_DOUBT} THEN NULL ELSE s.remote_id END,"
    f" CASE WHEN {_IN_DOUBT} THEN false ELSE s.remote_active END, s.remote_code"
)
_EXIT_REMOTE = (
    f"s.changes, CASE WHEN {_IN_DOUBT} THEN NULL ELSE s.remote_id END,"
    f" CASE WHEN {_IN_DOUBT} THEN true ELSE s.remote_active END, s.remote_code"
)


PAGE = 2_000  # rows per page: each page is a keyset range of one indexed table; small pages are cheaper


# A connection's diff, written once per run: one evaluation of both anti-joins (paging them directly
# re-evaluated the joins over the rest of the range for every page).
_DIFF_EXITS = f" UNION ALL SELECT :destination_id, false, s.user_id, s.traits, {_EXIT_REMOTE}" + _EXITS


DIFF = sa.text(
    f"INSERT INTO {sync_stage_diff.name}"
    f" SELECT :destination_id, true, m.user_id, m.traits, {_ENTRY_REMOTE}" + _ENTRIES + _DIFF_EXITS
)


# `initial --resend`: every staged member is an entry again (accepted changes still count for messageIds),
# and accepted members who left are exits as in any run.
DIFF_RESEND = sa.text(
    f"INSERT INTO {sync_stage_diff.name}"
    f" SELECT :destination_id, true, m.user_id, m.traits, {_ENTRY_REMOTE} FROM {sync_stage.name} m"
    "  LEFT JOIN sync_state s"
    "    ON s.audience_id = :audience_id AND s.destination_id = :destination_id AND s.user_id = m.user_id"
    + _DIFF_EXITS
)


ENTRIES_PAGE = sa.text(
    f"SELECT user_id, traits, changes, remote_id, remote_active, remote_code FROM {sync_stage_diff.name}"
    " WHERE destination_id = :destination_id AND value = true AND user_id > :after"
    " ORDER BY user_id LIMIT :limit"
)


# An exit is read with the user's state as it is now: `forget` may have removed the user meanwhile.
EXITS_PAGE = sa.text(
    f"SELECT s.user_id, s.traits, {_EXIT_REMOTE} FROM {sync_stage_diff.name} d"
    " JOIN sync_state s ON s.audience_id = :audience_id AND s.destination_id = :destination_id"
    "   AND s.user_id = d.user_id AND (s.member = true OR s.in_doubt_since IS NOT NULL)"
    " WHERE d.destination_id = :destination_id AND d.value = false AND d.user_id > :after"
    " ORDER BY d.user_id LIMIT :limit"
)


# With --resend, the staged members were accepted too (forget_connection marked them not accepted).
DIFF_COUNTS = """
    SELECT
      (SELECT count(*) FROM {stage}) AS members,
      (SELECT count(*) FROM sync_state s
       WHERE s.audience_id = :audience_id AND s.destination_id = :destination_id
         AND (s.member = true OR s.in_doubt_since IS NOT NULL {or_staged})
      ) AS accepted_members,
      (SELECT count(*) FROM {diff} WHERE destination_id = :destination_id AND value = true) AS entries,
      (SELECT count(*) FROM {diff} WHERE destination_id = :destination_id AND value = false) AS exits
"""


# A connection without history (its initial sync): every staged member is an entry, nothing is an exit.
STAGED = sa.text(
    f"SELECT m.user_id, m.traits FROM {sync_stage.name} m"
    " WHERE m.user_id > :after ORDER BY m.user_id LIMIT :limit"
)


_OF_CONNECTION = "WHERE audience_id = :audience_id AND destination_id = :destination_id"


HISTORY = sa.text(
    f"SELECT EXISTS (SELECT 1 FROM sync_state {_OF_CONNECTION})"
    f" OR EXISTS (SELECT 1 FROM sync_rejections {_OF_CONNECTION})"
)


class Counts(NamedTuple):
    members: int
    accepted_members: int
    entries: int
    exits: int


class Diff:
    """One connection's pending changes in a run: the staged members against what the destination accepted.

    Computed once, when the connection's run starts, into `sync_stage_diff`; what the run then records
    does not change it. A connection without history (nothing accepted or rejected: its initial sync)
    skips that: every staged member is an entry, read from the staged members directly. With `resend`,
    every staged member is an entry, whatever was accepted or rejected, and accepted members who left are
    exits (a dry run previews `initial --resend` this way, without writing).
    """

    def __init__(
        self, reads: SharedReads, audience_id: int, destination_id: int, resend: bool = False
    ) -> None:
        self.reads = reads
        self.ids = {"audience_id": audience_id, "destination_id": destination_id}
        self.resend = resend
        # In a dry run (`keep_transaction`) this write stays uncommitted until the run rolls back; it
        # takes no lock on the state database (a temporary table), but holds its snapshot meanwhile.
        with reads.turn(writes=True) as conn:
            self.fresh = not conn.execute(HISTORY, self.ids).scalar()
            conn.execute(sa.schema.CreateTable(sync_stage_diff, if_not_exists=True))
            for index in sync_stage_diff.indexes:
                conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
            conn.execute(sa.delete(sync_stage_diff).where(sync_stage_diff.c.destination_id == destination_id))
            if not self.fresh:
                conn.execute(DIFF_RESEND if resend else DIFF, self.ids)
                if conn.dialect.name == "postgresql":  # else it plans exits' pages for a dozen rows
                    conn.exec_driver_sql(f"ANALYZE {sync_stage_diff.name}")

    def counts(self) -> Counts:
        """members, accepted_members, entries and exits (mass-exit guard, progress)."""
        with self.reads.turn() as conn:
            if self.fresh:
                members = conn.scalar(sa.select(sa.func.count()).select_from(sync_stage)) or 0
                return Counts(members, 0, members, 0)
            or_staged = f"OR s.user_id IN (SELECT user_id FROM {sync_stage.name})" if self.resend else ""
            counts = DIFF_COUNTS.format(stage=sync_stage.name, diff=sync_stage_diff.name, or_staged=or_staged)
            return Counts(*conn.execute(sa.text(counts), self.ids).one())

    def page(self, value: bool, after: str, limit: int) -> list[tuple[Any, ...]]:
        """The next page of entries (value True) or exits (False) after user id `after`, as the driver's rows.

        At a million rows SQLAlchemy `Row`s cost more than the SQL; rows become `Change`s a batch at a time.
        """
        if self.fresh and not value:
            return []
        statement = STAGED if self.fresh else ENTRIES_PAGE if value else EXITS_PAGE
        params = {**self.ids, "after": after, "limit": limit}
        with self.reads.turn() as conn, conn.execute(statement, params) as result:
            try:
                return list(result.cursor.fetchall())
            except sqlite3.OperationalError as exc:  # SQLite stores any bytes as text; reading checks them
                if "decode" not in str(exc):  # not the check of the text read
                    raise
                column = re.search(r"column '(\w+)'", str(exc))  # not the text: it holds a member's data
                raise SourceError(
                    f"the query returned a value that is not UTF-8 text (staged in column "
                    f"{column[1] if column else '?'}); make it return text, e.g. hex() of a BLOB"
                ) from None

    def changes(self, rows: list[tuple[Any, ...]], value: bool) -> list[Change]:
        """`Change`s from rows of `page`."""
        if self.fresh:  # (user_id, traits): no more columns, each costs at a million rows
            return [Change(user_id, True, traits, 0) for user_id, traits in rows]
        return [
            Change(user_id, value, traits, changes or 0, remote_id, remote_active in (None, 1, True), code)
            for user_id, traits, changes, remote_id, remote_active, code in rows
        ]

    def batches(self, value: bool, size: int) -> Iterator[list[Change]]:
        """Every pending entry or exit in batches of `size`, read from the database in larger pages.

        Each page is read whole before its first batch is handed out, so the caller may record and commit
        between batches. A page's rows become `Change`s a batch at a time: built a page at a time, they
        outlive the young garbage-collector generations and trigger full collections (about 1 s at 1M rows).
        """
        after, limit = "", max(size, PAGE)
        while True:
            page = self.page(value, after, limit)
            for start in range(0, len(page), size):
                yield self.changes(page[start : start + size], value)
            if len(page) < limit:
                return
            after = page[-1][0]
