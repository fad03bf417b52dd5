"""The diff contract, driven through sync.state on both backends: what is pending, what recording does."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync import diff as diff_module
from sync import leases, state
from sync.audiences import Audience, load_audiences
from sync.connections import Link
from sync.diff import Diff
from sync.models import Change, Outcome, Status, accepted, failed, rejected
from sync.staging import SharedReads, Staged, stage_members
from sync.tables import sync_leases, sync_rejections, sync_runs, sync_state
from tests.conftest import Config, Customers

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
EVERFLOW = {"tracking_domain": "http://127.0.0.1:1", "network_id": "1"}


@dataclass
class Sync:
    """One connection (audience -> destination) and the calls a run makes on its state."""

    engine: sa.Engine
    audience: Audience
    destination_id: int
    members: sa.Connection  # holds the staged members (a temporary table), as in a run

    def stage(self) -> Staged:
        return stage_members(self.members, self.engine, self.audience, 10.0)

    def pending(
        self, value: bool, after: str = "", limit: int = 1000, diff: Diff | None = None
    ) -> list[Change]:
        """A page of a run's diff (`diff`, or a new run's)."""
        diff = diff or self.diff()
        return diff.changes(diff.page(value, after=after, limit=limit), value)

    def diff(self, resend: bool = False) -> Diff:
        """The diff a run computes when it starts."""
        return Diff(SharedReads(self.members), self.audience.id, self.destination_id, resend)

    def all_pending(self, value: bool, limit: int = 1000) -> list[Change]:
        """Every page of one run's diff, keyset by keyset."""
        changes: list[Change] = []
        after, diff = "", self.diff()
        while page := self.pending(value, after=after, limit=limit, diff=diff):
            assert len(page) <= limit
            changes += page
            after = page[-1].user_id
        return changes

    def record(self, outcomes: Iterable[Outcome], now: datetime = NOW) -> None:
        with self.engine.begin() as conn:
            state.record(conn, self.audience.id, self.destination_id, list(outcomes), now)

    def accept_all(self, limit: int = 1000) -> None:
        diff = self.diff()  # one run: each page accepted before the next is read
        for value in (True, False):
            after = ""
            while page := self.pending(value, after=after, limit=limit, diff=diff):
                self.record(accepted(change) for change in page)
                after = page[-1].user_id

    def accepted_members(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(
                conn.scalars(
                    sa.select(sync_state.c.user_id).where(
                        sync_state.c.audience_id == self.audience.id,
                        sync_state.c.destination_id == self.destination_id,
                        sync_state.c.member,
                    )
                )
            )

    def rejections(self) -> dict[str, tuple[bool, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(sync_rejections).where(
                    sync_rejections.c.audience_id == self.audience.id,
                    sync_rejections.c.destination_id == self.destination_id,
                )
            ).all()
        return {row.user_id: (row.value, row.reason) for row in rows}

    def counts(self) -> dict[str, int]:
        return self.diff().counts()._asdict()

    def connection(self) -> Link:
        return Link(self.audience.id, self.audience.key, self.destination_id, "Everflow")


@pytest.fixture
def sync(engine: sa.Engine, config: Config, customers: Customers) -> Iterator[Sync]:
    audience_id = config.audience("VIP Customers", Customers.QUERY)
    destination_id = config.destination("Everflow", "everflow", EVERFLOW)
    config.connect(audience_id, destination_id)
    with engine.connect() as conn:
        valid, problems = load_audiences(conn)
    assert problems == {}
    with engine.connect() as members:
        yield Sync(engine, valid[0], destination_id, members)


def ids(changes: Iterable[Change]) -> list[str]:
    return [change.user_id for change in changes]


def by_user(changes: Iterable[Change]) -> dict[str, Change]:
    return {change.user_id: change for change in changes}


def traits_of(user: str, email: str | None = None) -> dict[str, Any]:
    return {
        "email": email or f"{user}@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "transaction_id": f"tid-{user}",
    }


def set_email(config: Config, user: str, email: str) -> None:
    config.sql("UPDATE customers SET email = :e WHERE user_id = :u", e=email, u=user)


def test_first_sync_is_only_entries(sync: Sync, customers: Customers) -> None:
    customers.add("u1", "u2", "u3")
    customers.add("u4", segment="other")
    sync.stage()

    entries = sync.pending(True)

    assert ids(entries) == ["u1", "u2", "u3"]
    assert all(change.value is True and change.settled_before == 0 for change in entries)
    assert by_user(entries)["u2"].traits == traits_of("u2")
    assert sync.pending(False) == []


def test_record_advances_only_accepted_and_skipped(sync: Sync, customers: Customers) -> None:
    customers.add("u1", "u2", "u3", "u4")
    sync.stage()
    entries = by_user(sync.pending(True))

    sync.record(
        [
            accepted(entries["u1"]),
            Outcome(entries["u2"], Status.SKIPPED, "no event mapping for 'Audience Entered'"),
            failed(entries["u3"], "HTTP 503"),
        ]
    )

    assert sync.accepted_members() == {"u1", "u2"}
    assert ids(sync.pending(True)) == ["u3", "u4"]  # failed and unanswered stay pending
    assert sync.pending(False) == []
    assert sync.rejections() == {}


def test_unchanged_members_have_nothing_pending(sync: Sync, customers: Customers) -> None:
    customers.add("u1", "u2")
    sync.stage()
    sync.accept_all()

    sync.stage()

    assert sync.pending(True) == [] and sync.pending(False) == []


def test_a_rejected_entry_waits_until_the_users_traits_change(
    sync: Sync, customers: Customers, config: Config
) -> None:
    customers.add("u1", "u2")
    sync.stage()
    entries = by_user(sync.pending(True))

    sync.record([rejected(entries["u1"], "Everflow requires a TransactionId")])

    assert ids(sync.pending(True)) == ["u2"]
    assert sync.rejections() == {"u1": (True, "Everflow requires a TransactionId")}
    assert sync.accepted_members() == set()
    sync.stage()  # same traits next run: still not offered
    assert ids(sync.pending(True)) == ["u2"]
    assert sync.counts()["entries"] == 1

    set_email(config, "u1", "new@example.com")
    sync.stage()

    retried = by_user(sync.pending(True))
    assert set(retried) == {"u1", "u2"}
    assert sync.counts()["entries"] == 2
    assert retried["u1"].traits["email"] == "new@example.com"
    sync.record([accepted(retried["u1"])])
    assert sync.accepted_members() == {"u1"}
    assert sync.rejections() == {}


def test_a_rejected_exit_removes_the_user_and_records_why(sync: Sync, customers: Customers) -> None:
    customers.add("u1", "u2")
    sync.stage()
    sync.accept_all()
    customers.move("u1", segment="other")
    sync.stage()
    exits = sync.pending(False)
    assert ids(exits) == ["u1"]

    sync.record([rejected(exits[0], "HTTP 404: no such affiliate")])

    assert sync.accepted_members() == {"u2"}
    assert sync.pending(False) == []
    assert sync.rejections() == {"u1": (False, "HTTP 404: no such affiliate")}
    assert sync.counts() == {"members": 1, "accepted_members": 1, "entries": 0, "exits": 0}

    customers.move("u1", segment="vip")  # a later re-entry is a normal entry
    sync.stage()
    assert ids(sync.pending(True)) == ["u1"]


def test_a_failed_exit_stays_pending(sync: Sync, customers: Customers) -> None:
    customers.add("u1")
    sync.stage()
    sync.accept_all()
    customers.move("u1", segment="other")
    sync.stage()

    sync.record([failed(change, "timed out") for change in sync.pending(False)])

    assert ids(sync.pending(False)) == ["u1"]
    assert sync.accepted_members() == {"u1"}


def test_an_exit_carries_the_traits_last_sent(sync: Sync, customers: Customers, config: Config) -> None:
    customers.add("u1")
    sync.stage()
    sync.accept_all()
    set_email(config, "u1", "changed@example.com")
    sync.stage()
    assert sync.pending(True) == []  # a trait change alone is not a membership change
    customers.move("u1", segment="other")
    sync.stage()

    exits = sync.pending(False)

    assert ids(exits) == ["u1"]
    assert exits[0].value is False
    assert exits[0].traits == traits_of("u1")


def test_changes_count_accepted_changes_for_stable_message_ids(sync: Sync, customers: Customers) -> None:
    connection = sync.connection()
    customers.add("u1")
    sync.stage()
    [entry] = sync.pending(True)
    assert entry.settled_before == 0

    sync.record([failed(entry, "HTTP 503")])
    [resend] = sync.pending(True)
    assert resend.settled_before == 0
    assert connection.message_id(resend) == connection.message_id(entry)  # a re-send keeps its id

    sync.record([accepted(resend)])
    customers.move("u1", segment="other")
    sync.stage()
    [exit_] = sync.pending(False)
    assert exit_.settled_before == 1
    sync.record([accepted(exit_)])
    customers.move("u1", segment="vip")
    sync.stage()

    [reentry] = sync.pending(True)
    assert reentry.settled_before == 2
    assert reentry.value == entry.value
    assert connection.message_id(reentry) != connection.message_id(entry)  # a re-entry gets a new one
    assert len({connection.message_id(c) for c in (entry, exit_, reentry)}) == 3


def test_a_skipped_change_counts_as_a_change(sync: Sync, customers: Customers) -> None:
    customers.add("u1")
    sync.stage()
    sync.record([Outcome(c, Status.SKIPPED, "no mapping") for c in sync.pending(True)])
    customers.move("u1", segment="other")
    sync.stage()

    [exit_] = sync.pending(False)

    assert exit_.settled_before == 1


USERS = [f"u{n:02d}" for n in range(23)]


def test_keyset_paging_returns_every_change_exactly_once(sync: Sync, customers: Customers) -> None:
    customers.add(*USERS)
    sync.stage()

    entries = sync.all_pending(True, limit=5)

    assert ids(entries) == USERS

    # Accepting each page before asking for the next one (as a run does) loses and repeats nothing.
    seen: list[str] = []
    taken: list[str] = []
    after, diff = "", sync.diff()
    while page := sync.pending(True, after=after, limit=5, diff=diff):
        seen += ids(page)
        taken += ids(page[::2])  # about half accepted, the rest still pending
        sync.record(accepted(change) for change in page[::2])
        after = page[-1].user_id
    assert seen == USERS
    assert sync.accepted_members() == set(taken)
    assert ids(sync.all_pending(True, limit=5)) == [user for user in USERS if user not in taken]

    sync.accept_all(limit=5)
    customers.move(*USERS[:17], segment="other")
    sync.stage()
    assert ids(sync.all_pending(False, limit=4)) == USERS[:17]
    assert sync.all_pending(True, limit=4) == []


@pytest.mark.parametrize("history", [False, True])  # the initial sync reads the staged members alone
@pytest.mark.parametrize("page", [4, 5, 23])  # USERS has 23: the last page short, or exactly full
def test_batches_over_several_pages_hold_every_change_once(
    sync: Sync, customers: Customers, monkeypatch: pytest.MonkeyPatch, page: int, history: bool
) -> None:
    monkeypatch.setattr(diff_module, "PAGE", page)
    customers.add(*USERS)
    if history:  # an exit accepted earlier: not a member now, so no change for it in this run
        sync.record([accepted(Change("zz", False, "{}", 0))])
    sync.stage()
    diff = sync.diff()
    assert diff.fresh is not history

    batches = []
    for batch in diff.batches(True, 3):  # recorded as they go, as a run does
        batches.append(batch)
        sync.record(accepted(change) for change in batch)

    assert ids(change for batch in batches for change in batch) == USERS
    assert list(diff.batches(False, 3)) == []
    assert sync.pending(True) == [] and sync.pending(False) == []  # the next run: all accepted, no exit
    pages = [page] * (len(USERS) // page) + ([len(USERS) % page] if len(USERS) % page else [])
    assert [len(batch) for batch in batches] == [min(3, n - i) for n in pages for i in range(0, n, 3)]


def test_a_user_forgotten_during_a_run_gets_no_exit(sync: Sync, customers: Customers) -> None:
    customers.add("u1", "u2")
    sync.stage()
    sync.accept_all()
    customers.move("u1", "u2", segment="other")
    sync.stage()
    diff = sync.diff()  # the run starts: u1 and u2 are exits
    with sync.engine.begin() as conn:  # as `audience-sync forget u1` does, meanwhile
        conn.execute(sa.delete(sync_state).where(sync_state.c.user_id == "u1"))

    assert ids(change for batch in diff.batches(False, 10) for change in batch) == ["u2"]


def test_remote_ids_reach_exits_and_resends(sync: Sync, customers: Customers) -> None:
    """Refersion's affiliate id and active flag, as accepted, are what an exit or a resend works with."""
    customers.add("u1", "u2")
    sync.stage()
    [first, second] = sync.pending(True)
    sync.record(
        [accepted(first, remote_id="aff-1"), accepted(second, remote_id="aff-2", remote_active=False)]
    )
    resent = by_user(sync.pending(True, diff=sync.diff(resend=True)))
    assert [(c.remote_id, c.remote_active, c.settled_before) for c in resent.values()] == [
        ("aff-1", True, 1),
        ("aff-2", False, 1),
    ]

    customers.move("u1", "u2", segment="other")
    sync.stage()
    exits = by_user(sync.all_pending(False))
    assert [(c.remote_id, c.remote_active, c.settled_before) for c in exits.values()] == [
        ("aff-1", True, 1),
        ("aff-2", False, 1),
    ]


def test_counts(sync: Sync, customers: Customers) -> None:
    customers.add("u1", "u2", "u3")
    sync.stage()
    assert sync.counts() == {"members": 3, "accepted_members": 0, "entries": 3, "exits": 0}
    sync.accept_all()
    customers.move("u1", "u2", segment="other")
    customers.add("u4")
    sync.stage()

    assert sync.counts() == {"members": 2, "accepted_members": 3, "entries": 1, "exits": 2}


def test_leases_expire_by_the_database_clock(sync: Sync) -> None:
    audience_id = sync.audience.id
    with sync.engine.begin() as conn:
        assert leases.acquire(conn, audience_id, "host-a:1", 60) is None
        assert leases.acquire(conn, audience_id, "host-b:2", 60) == "host-a:1"
        assert leases.acquire(conn, audience_id, "host-a:1", 60) is None  # the owner renews
        stored = conn.scalar(sa.select(sync_leases.c.expires_at))
        # expiry is the database's now + ttl, stored as any other time (aware UTC on both backends)
        assert stored is not None and stored.tzinfo is not None
        assert abs((stored - datetime.now(UTC)).total_seconds() - 60) < 30
        # Expired by the database's clock: the second owner takes it.
        conn.execute(sa.update(sync_leases).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        assert leases.acquire(conn, audience_id, "host-b:2", 60) is None
        assert leases.acquire(conn, audience_id, "host-a:1", 60) == "host-b:2"

        leases.release(conn, audience_id, "host-a:1")  # not the holder: no effect
        assert leases.acquire(conn, audience_id, "host-a:1", 60) == "host-b:2"
        leases.release(conn, audience_id, "host-b:2")
        assert leases.acquire(conn, audience_id, "host-a:1", 60) is None


def test_utc_round_trip(sync: Sync) -> None:
    started = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    finished = datetime(2026, 3, 29, 0, 0, 1, tzinfo=UTC)
    with sync.engine.begin() as conn:
        state.record_run(
            conn,
            {
                "audience_id": sync.audience.id,
                "destination_id": sync.destination_id,
                "started_at": started,
                "finished_at": finished,
                "outcome": "ok",
            },
        )
    with sync.engine.connect() as conn:
        row = conn.execute(sa.select(sync_runs.c.started_at, sync_runs.c.finished_at)).one()
        last = state.last_run_times(conn)

    assert row.started_at == started
    assert row.started_at.utcoffset() == timedelta(0)
    assert row.finished_at == finished
    assert row.finished_at.utcoffset() == timedelta(0)
    assert last == {sync.audience.id: started}
    assert last[sync.audience.id].utcoffset() == timedelta(0)


def test_a_naive_datetime_is_refused(sync: Sync, customers: Customers) -> None:
    customers.add("u1")
    sync.stage()

    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        sync.record([accepted(c) for c in sync.pending(True)], now=datetime(2026, 1, 1))  # noqa: DTZ001


member_sets = st.sets(st.sampled_from([f"u{n}" for n in range(12)]), max_size=12)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(old=member_sets, new=member_sets, refused=member_sets)
def test_applying_the_diff_gives_the_new_state(
    sync: Sync, customers: Customers, old: set[str], new: set[str], refused: set[str]
) -> None:
    with sync.engine.begin() as conn:
        for table in ("customers", "sync_state", "sync_rejections"):
            conn.exec_driver_sql(f"DELETE FROM {table}")

    def become(users: set[str]) -> None:
        with sync.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM customers")
        if users:
            customers.add(*sorted(users))
        sync.stage()

    become(old)
    sync.accept_all(limit=3)
    assert sync.accepted_members() == old
    assert sync.pending(True) == [] and sync.pending(False) == []  # a state diffed with itself is empty

    become(new)
    entries = set(ids(sync.all_pending(True, limit=3)))
    exits = set(ids(sync.all_pending(False, limit=3)))

    assert not entries & exits
    assert entries == new - old
    assert exits == old - new
    assert sync.counts() == {
        "members": len(new),
        "accepted_members": len(old),
        "entries": len(entries),
        "exits": len(exits),
    }
    sync.record(rejected(c, "refused") for c in sync.all_pending(True) if c.user_id in refused)
    assert set(ids(sync.all_pending(True))) == entries - refused  # until their traits change
    assert sync.counts()["entries"] == len(entries - refused)
    sync.accept_all(limit=3)
    assert sync.accepted_members() == new - (refused - old)
    assert sync.pending(True) == [] and sync.pending(False) == []
