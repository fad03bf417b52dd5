"""Audience keys, validation of `audiences` rows, and staging a query's result into `sync_members`."""

import gc
import json
from typing import Any

import pytest
import sqlalchemy as sa

from sync import database
from sync.audiences import Audience, derive_key, load_audiences
from sync.errors import SourceError
from sync.staging import Staged, stage_members
from sync.tables import sync_stage
from tests.conftest import Config, Customers

TIMEOUT = 10.0


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30 Days", "order_completed_last_30_days"),
        ("order_completed_last_30days", "order_completed_last_30days"),
        ("High-Value Customers", "high_value_customers"),
        ("VIPCustomers", "vip_customers"),
        ("Über Käufer", "uber_kaufer"),
    ],
)
def test_derive_key(name: str, key: str) -> None:
    assert derive_key(name) == key


def load(engine: sa.Engine) -> tuple[list[Audience], dict[int, str]]:
    with engine.connect() as conn:
        return load_audiences(conn)


def the_audience(config: Config, name: str, query: str, **extra: Any) -> Audience:
    audience_id = config.audience(name, query, **extra)
    valid, problems = load(config.engine)
    assert audience_id not in problems, problems[audience_id]
    return next(a for a in valid if a.id == audience_id)


def test_valid_audiences_get_their_derived_or_stored_key(config: Config) -> None:
    derived = config.audience("Order Completed Last 30 Days", "SELECT 1 AS user_id")
    stored = config.audience("Renamed Later", "SELECT 1 AS user_id", key="vip_customers")

    valid, problems = load(config.engine)

    assert problems == {}
    keys = {a.id: (a.key, a.key_stored) for a in valid}
    assert keys == {derived: ("order_completed_last_30_days", False), stored: ("vip_customers", True)}


def test_name_without_a_key_is_invalid_and_says_to_set_the_key(config: Config) -> None:
    bad = config.audience("!!!", "SELECT 1 AS user_id")
    good = config.audience("High-Value Customers", "SELECT 1 AS user_id")

    valid, problems = load(config.engine)

    assert [a.id for a in valid] == [good]
    assert set(problems) == {bad}
    assert f"audiences row id={bad}" in problems[bad]
    assert "'!!!'" in problems[bad]
    assert "set audiences.key by hand" in problems[bad]


def test_a_key_set_by_hand_must_be_snake_case(config: Config) -> None:
    bad = config.audience("Fine Name", "SELECT 1 AS user_id", key="Not Snake")

    _, problems = load(config.engine)

    assert f"audiences row id={bad}" in problems[bad]
    assert "'Not Snake'" in problems[bad]
    assert "from key" in problems[bad]


def test_a_key_set_by_hand_fixes_an_underivable_name(config: Config) -> None:
    fixed = config.audience("!!!", "SELECT 1 AS user_id", key="bangs")

    valid, problems = load(config.engine)

    assert problems == {}
    assert [(a.id, a.key) for a in valid] == [(fixed, "bangs")]


def test_a_derived_key_shared_is_an_error_for_all_and_a_stored_key_keeps_its_owner(config: Config) -> None:
    first = config.audience("VIP Customers", "SELECT 1 AS user_id")
    second = config.audience("VIPCustomers", "SELECT 2 AS user_id")
    by_hand = config.audience("Something Else", "SELECT 3 AS user_id", key="high_value_customers")
    derived = config.audience("High-Value Customers", "SELECT 4 AS user_id")
    other = config.audience("Other", "SELECT 5 AS user_id")

    valid, problems = load(config.engine)

    assert [a.id for a in valid] == [by_hand, other]  # an audience added later cannot take a stored key
    assert set(problems) == {first, second, derived}
    for audience_id in (first, second):
        assert "'vip_customers'" in problems[audience_id]
        assert "'VIP Customers'" in problems[audience_id] and "'VIPCustomers'" in problems[audience_id]
    assert problems[derived] == (
        f"audience 'High-Value Customers' (id {derived}): key 'high_value_customers' (from name) belongs "
        f"to audience 'Something Else' (id {by_hand}); set audiences.key"
    )


def test_a_disabled_audience_still_owns_its_key(config: Config) -> None:
    # audiences.key is unique: an enabled audience deriving a key a disabled one has stored cannot store it.
    config.audience("VIP Customers", "SELECT 1 AS user_id", key="vip_customers", enabled=False)
    clash = config.audience("VIPCustomers", "SELECT 2 AS user_id")

    valid, problems = load(config.engine)

    assert valid == []
    assert "'vip_customers'" in problems[clash]


def test_problems_name_the_row_and_field_and_never_stop_the_others(config: Config) -> None:
    empty = config.audience("Empty Query", "   ")
    schedule = config.audience("Bad Schedule", "SELECT 1 AS user_id", schedule="soon")
    good = config.audience("Good", "SELECT 1 AS user_id", schedule="90m")
    config.audience("Disabled", "   ", enabled=False)

    valid, problems = load(config.engine)

    assert [a.id for a in valid] == [good]
    assert valid[0].cadence is not None and valid[0].cadence.low == 5400
    assert set(problems) == {empty, schedule}
    assert f"audiences row id={empty} ('Empty Query')" in problems[empty]
    assert "query" in problems[empty]
    assert f"audiences row id={schedule} ('Bad Schedule')" in problems[schedule]
    assert "schedule" in problems[schedule] and "'soon'" in problems[schedule]


def stage(
    engine: sa.Engine, audience: Audience, timeout: float = TIMEOUT, source: sa.Engine | None = None
) -> tuple[Staged, dict[str, dict[str, Any]]]:
    """Stage the audience's members; how stage_members counted them, and the rows it staged."""
    with engine.connect() as conn:
        staged = stage_members(conn, source or engine, audience, timeout)
        rows = conn.execute(sa.select(sync_stage)).all()
    assert len(rows) == len({row.user_id for row in rows}) == staged.members  # one row per user
    return staged, {row.user_id: json.loads(row.traits) for row in rows}


def customer_ids(engine: sa.Engine) -> list[str | None]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT user_id FROM customers ORDER BY user_id")))


def test_members_are_staged_with_their_traits(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    customers.add("u3", segment="other")
    audience = the_audience(config, "VIP", Customers.QUERY)

    staged, members = stage(engine, audience)

    assert staged == Staged(members=2, null_user_ids=0, duplicate_user_ids=0, long_user_ids=0)
    assert members == {
        user: {
            "email": f"{user}@example.com",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "transaction_id": f"tid-{user}",
        }
        for user in ("u1", "u2")
    }


def test_restaging_replaces_the_members(engine: sa.Engine, config: Config, customers: Customers) -> None:
    customers.add("u1", "u2")
    audience = the_audience(config, "VIP", Customers.QUERY)
    with engine.connect() as conn:
        stage_members(conn, engine, audience, TIMEOUT)
        customers.move("u1", segment="other")
        customers.add("u3")

        assert stage_members(conn, engine, audience, TIMEOUT).members == 2
        assert set(conn.scalars(sa.select(sync_stage.c.user_id))) == {"u2", "u3"}


def test_user_id_is_compared_as_text(engine: sa.Engine, config: Config) -> None:
    audience = the_audience(config, "Numbers", "SELECT 7 AS user_id, 'x' AS email")

    assert stage(engine, audience)[1] == {"7": {"email": "x"}}


def test_null_user_ids_are_skipped_and_counted(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    config.sql(
        "INSERT INTO customers (user_id, email, segment) VALUES (NULL, 'a@x', 'vip'), (NULL, 'b@x', 'vip')"
    )
    audience = the_audience(config, "VIP", Customers.QUERY)

    staged, members = stage(engine, audience)

    assert staged == Staged(members=1, null_user_ids=2, duplicate_user_ids=0, long_user_ids=0)
    assert set(members) == {"u1"}


def test_duplicate_user_ids_collapse_and_are_counted(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    config.sql("INSERT INTO customers (user_id, email, segment) VALUES ('u1', 'second@x', 'vip')")
    config.sql("INSERT INTO customers (user_id, email, segment) VALUES ('u1', 'third@x', 'vip')")
    audience = the_audience(config, "VIP", "SELECT user_id, email FROM customers")

    staged, members = stage(engine, audience)

    assert staged == Staged(members=2, null_user_ids=0, duplicate_user_ids=2, long_user_ids=0)
    assert set(members) == {"u1", "u2"}
    if engine.dialect.name == "sqlite":
        assert members["u1"]["email"] == "u1@example.com"  # the first row the query returned
    else:  # the first in physical order: usually, not always, the query's (see DEDUPLICATE)
        assert members["u1"]["email"] in {"u1@example.com", "second@x", "third@x"}


def test_nulls_and_duplicates_in_one_query_are_counted_apart(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    config.sql(
        "INSERT INTO customers (user_id, email, segment) VALUES"
        " ('u1', 'again@x', 'vip'), (NULL, 'a@x', 'vip'), ('', 'b@x', 'vip'), (NULL, 'c@x', 'vip')"
    )
    audience = the_audience(config, "VIP", "SELECT user_id, email FROM customers")

    staged, members = stage(engine, audience)

    # '' counts as no user id
    assert staged == Staged(members=2, null_user_ids=3, duplicate_user_ids=1, long_user_ids=0)
    assert set(members) == {"u1", "u2"}


def test_a_query_without_user_id_raises_naming_the_audience(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    audience = the_audience(config, "No Id", "SELECT email FROM customers")

    with pytest.raises(SourceError, match="user_id") as raised:
        stage(engine, audience)

    assert "'No Id'" in str(raised.value)
    assert f"id {audience.id}" in str(raised.value)
    del raised
    gc.collect()  # a source cursor left open warns now (an error under -W error), not in a later test


def test_a_syntax_error_raises_source_error(engine: sa.Engine, config: Config) -> None:
    audience = the_audience(config, "Broken", "SELEC user_id FROM nowhere")

    with pytest.raises(SourceError, match="'Broken'.*query failed"):
        stage(engine, audience)


def test_a_query_sees_a_read_only_transaction(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    if engine.dialect.name == "postgresql":
        probe = "current_setting('transaction_read_only')"
        expected: object = "on"
    else:
        probe = "(SELECT query_only FROM pragma_query_only)"
        expected = 1
    audience = the_audience(config, "Probe", f"SELECT user_id, {probe} AS read_only FROM customers")
    # SQLite stages a same-engine source with INSERT ... SELECT under an authorizer (see the write attempts
    # below); another engine, even on the same file, is streamed from a `PRAGMA query_only` connection.
    source = database.create_engine(engine.url.render_as_string(hide_password=False))

    members = stage(engine, audience, source=source)[1]
    source.dispose()

    assert members == {"u1": {"read_only": expected}}


def write_attempts(backend: str) -> list[str]:
    """Queries that would write to `customers` if they ran with write access."""
    attempts = [
        # Breaking out of the subquery the query is wrapped in, to run a second statement.
        "SELECT user_id FROM customers) AS a; DELETE FROM customers; SELECT * FROM (SELECT 'x' AS user_id",
    ]
    if backend == "postgres":
        attempts += [
            "WITH x AS (DELETE FROM customers RETURNING user_id) SELECT user_id FROM x",
            "SELECT zap() AS user_id",  # a volatile function that deletes
            # ... and to end the read-only transaction first.
            "SELECT user_id FROM customers) AS a; COMMIT; DELETE FROM customers; "
            "SELECT * FROM (SELECT 'x' AS user_id",
        ]
    return attempts


def test_a_query_that_writes_is_refused_and_writes_nothing(
    backend: str, state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    if backend == "postgres":
        config.sql(
            "CREATE FUNCTION zap() RETURNS text LANGUAGE sql VOLATILE AS "
            "'DELETE FROM customers RETURNING user_id'"
        )
    source = database.create_engine(state_url)  # its own pool: the same connection is checked below
    try:
        for number, query in enumerate(write_attempts(backend)):
            audience = the_audience(config, f"Writer {number}", query)
            with pytest.raises(SourceError, match=f"'Writer {number}'"):
                stage(engine, audience, source=source)
            assert customer_ids(engine) == ["u1", "u2"], query

        # The source connection is writable again after the runs (SQLite: PRAGMA query_only is reset).
        assert source.pool.checkedin() == 1
        with source.begin() as conn:
            if backend == "sqlite":
                assert conn.exec_driver_sql("PRAGMA query_only").scalar() == 0
            conn.exec_driver_sql("DELETE FROM customers WHERE user_id = 'u2'")
    finally:
        source.dispose()
    assert customer_ids(engine) == ["u1"]


def test_the_source_connection_is_writable_after_a_successful_run(
    backend: str, state_url: str, engine: sa.Engine, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    audience = the_audience(config, "VIP", Customers.QUERY)
    source = database.create_engine(state_url)
    try:
        assert stage(engine, audience, source=source)[0].members == 2
        assert source.pool.checkedin() == 1
        with source.begin() as conn:
            if backend == "sqlite":
                assert conn.exec_driver_sql("PRAGMA query_only").scalar() == 0
            conn.exec_driver_sql("DELETE FROM customers WHERE user_id = 'u2'")
    finally:
        source.dispose()
    assert customer_ids(engine) == ["u1"]


def slow_query(backend: str) -> str:
    if backend == "postgres":
        return "SELECT pg_sleep(5)::text AS user_id"
    return (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) "
        "SELECT count(*) AS user_id FROM c"
    )


def test_a_query_past_the_timeout_raises(backend: str, engine: sa.Engine, config: Config) -> None:
    audience = the_audience(config, "Slow", slow_query(backend))

    with pytest.raises(SourceError, match="'Slow'.*timed out") as raised:
        stage(engine, audience, timeout=0.5)

    assert "SYNC_QUERY_TIMEOUT" in str(raised.value)
