"""Privacy, third pass (issue 20 items 5-9): what a source user may read, who may read the state file, a
read-only state file left as it was, `forget` of an id nothing holds, a password in a source URL's query.

Through the real `audience-sync` command, on a SQLite and a Postgres state database where the state matters
(the file's modes are SQLite's), against the real MariaDB.
"""

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync import database
from sync.sandbox import SegmentServer
from tests.conftest import COMMAND, MARIADB_URL, Config, Customers, cli_env, free_port, run_cli
from tests.test_operations import DEPLOY
from tests.test_source_table import add_source, everything_printed
from tests.test_sources import Warehouse, customer, segment_destination


@pytest.fixture
def mariadb_users(mariadb: sa.Engine) -> Iterator[list[str]]:
    """The MariaDB users a test creates (names appended), dropped after it."""
    made: list[str] = []
    yield made
    with mariadb.begin() as conn:
        for user in made:
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")


def mariadb_user(mariadb: sa.Engine, made: list[str], *grants: str) -> str:
    """A new user with a password and `grants` (`... ON ...`); its URL, to put in the environment."""
    user, password = f"p_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    made.append(user)
    with mariadb.begin() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        for grant in grants:
            conn.exec_driver_sql(f"GRANT {grant} TO '{user}'@'%%'")
    url = sa.make_url(MARIADB_URL).set(username=user, password=password)
    return url.render_as_string(hide_password=False)


@pytest.mark.mariadb
def test_check_warns_about_a_mariadb_source_user_that_can_read_files_or_the_mysql_schema_but_not_a_reader(
    request: pytest.FixtureRequest,
    state_url: str,
    config: Config,
    mariadb: sa.Engine,
    mariadb_users: list[str],
    tmp_path: Path,
) -> None:
    """Item 5: FILE lets a query put LOAD_FILE('/etc/passwd') into traits, SELECT on `mysql` the password
    hashes; `check` names each such grant, and nothing for a user that may only SELECT the audience table."""
    shop = Warehouse("mariadb", tmp_path, mariadb)
    request.addfinalizer(shop.drop)
    shop.add(customer("m1"))
    privileged = mariadb_user(
        mariadb,
        mariadb_users,
        "FILE, SUPER ON *.*",
        "SELECT ON mysql.*",
        "SELECT (User, Priv) ON mysql.global_priv",
        f"SELECT ON {shop.table}",
    )
    reader = mariadb_user(mariadb, mariadb_users, f"SELECT ON {shop.table}")
    env = {"ROOT_URL": MARIADB_URL, "PRIVILEGED_URL": privileged, "READER_URL": reader}
    for name in env:
        add_source(config, name.lower(), url_env=name)
        config.audience(f"On {name.lower()}", shop.query(), source=name.lower())

    checked = run_cli(state_url, "check", env=env)

    printed = everything_printed(checked)
    assert checked.returncode == 0, printed
    assert not any(sa.make_url(url).password in printed for url in (privileged, reader))
    assert "IDENTIFIED" not in printed  # SHOW GRANTS shows the password hash; no message does
    warnings = [line for line in checked.stdout.splitlines() if line.startswith("warning: the source user")]
    user = f"`{mariadb_users[0]}`@`%`"
    assert sorted(line for line in warnings if user in line) == sorted(
        f"warning: the source user {user} holds {grant}: audience queries can {can}; "
        f"REVOKE {grant} FROM {user} (operator guide)"
        for grant, can in [
            (
                "FILE, SUPER ON *.*",
                "read server files into traits (LOAD_FILE); change server settings and bypass read_only",
            ),
            ("SELECT ON `mysql`.*", "read password hashes into traits (the mysql schema)"),
            (
                "SELECT (`Priv`, `User`) ON `mysql`.`global_priv`",
                "read password hashes into traits (the mysql schema)",
            ),
        ]
    )
    root = sa.make_url(MARIADB_URL).username
    [root_warning] = [line for line in warnings if line.startswith(f"warning: the source user `{root}`@")]
    assert root_warning.endswith(
        " holds ALL PRIVILEGES ON *.*: audience queries can read server files into traits (LOAD_FILE); "
        "change server settings and bypass read_only; read password hashes into traits (the mysql schema); "
        "use a SELECT-only user (operator guide)"
    ), root_warning
    assert len(warnings) == 4, warnings  # none for the reader
    assert mariadb_users[1] not in checked.stdout


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("umask", ["000", "022"])
def test_the_sqlite_state_file_and_its_wal_and_shm_are_created_0600_whatever_the_umask(
    tmp_path: Path, umask: str
) -> None:
    """Item 6: the file holds api_key values and member emails; SQLite gives its -wal and -shm its mode."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    upgraded = subprocess.run(
        ["sh", "-c", f'umask {umask} && exec "$0" "$@"', COMMAND, "db", "upgrade"],
        env=cli_env(url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert private(tmp_path / "state.db")
    before = os.umask(int(umask, 8))
    engine = database.create_engine(url)
    try:
        with engine.begin() as conn:  # SQLite makes the -wal and -shm files, kept while it is open
            conn.exec_driver_sql("CREATE TABLE written (x INTEGER)")
            assert sorted(p.name for p in tmp_path.iterdir()) == ["state.db", "state.db-shm", "state.db-wal"]
            assert all(private(path) for path in tmp_path.iterdir())
    finally:
        engine.dispose()
        os.umask(before)


def test_the_systemd_unit_keeps_the_state_directory_and_files_private() -> None:
    lines = (DEPLOY / "audience-sync.service").read_text().splitlines()
    service = lines[lines.index("[Service]") : lines.index("[Install]")]
    assert "UMask=0077" in service and "StateDirectoryMode=0700" in service


def test_check_warns_about_a_state_file_other_users_can_read(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    url = f"sqlite:///{path}"
    database.upgrade(url)
    warning = (
        f"warning: the state database file {path} can be read by other users (mode 0644): it holds api_key "
        f"values and member emails; chmod 600 {path} (and its -wal and -shm), and run with umask 077"
    )
    path.chmod(0o644)
    readable = run_cli(url, "check")
    path.chmod(0o640)
    group_readable = run_cli(url, "check")
    path.chmod(0o600)
    private_file = run_cli(url, "check")
    assert warning in readable.stdout.splitlines(), readable.stdout
    assert warning.replace("0644", "0640") in group_readable.stdout.splitlines(), group_readable.stdout
    assert "state database file" not in private_file.stdout, private_file.stdout
    assert [done.returncode for done in (readable, group_readable, private_file)] == [0, 0, 0]


def as_user_who_owns(directory: Path) -> list[str]:
    """The command prefix that runs as the owner of `directory` (root, who writes any file whatever its mode,
    runs the command as the unprivileged `nobody`, who owns the directory then)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): no way to run as a user file modes stop")
    nobody = pwd.getpwnam("nobody")
    for path in (directory, *directory.iterdir()):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


@pytest.fixture
def shared_directory() -> Iterator[Path]:
    """A directory outside pytest's (which only root may enter), for a state file another user owns."""
    directory = Path(tempfile.mkdtemp(prefix="audience-sync-"))
    yield directory
    shutil.rmtree(directory)


def test_a_refused_run_on_a_read_only_state_file_leaves_no_wal_or_shm_and_runs_once_it_is_writable(
    shared_directory: Path,
) -> None:
    """Item 7: SQLite opening a file it cannot write made -wal and -shm files as read-only as the file, and
    they kept refusing writes after `chmod 644`."""
    path = shared_directory / "state.db"
    url = f"sqlite:///{path}"
    database.upgrade(url)
    engine = database.create_engine(url)
    config = Config(engine)
    Customers(engine).add("u1")
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        engine.dispose()
        owner = as_user_who_owns(shared_directory)

        def command(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*owner, COMMAND, *args], env=cli_env(url), capture_output=True, text=True, timeout=60
            )

        path.chmod(0o444)
        # a command that only reads would leave them too (and a daemon started after it could not write)
        refused = [command("run"), command("status")]
        left = {p.name: stat.S_IMODE(p.stat().st_mode) for p in shared_directory.iterdir()}
        path.chmod(0o644)
        synced = command("run")

    assert left == {"state.db": 0o444}
    assert synced.returncode == 0, synced.stderr
    assert [m["userId"] for m in segment.messages] == ["u1"]
    for done in refused:
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1] == (
            f"audience-sync: the state database (sqlite file {path}) refuses writes: this user cannot write "
            f"{path} (mode 0444); make it writable (chmod u+w) or run as its owner"
        )


def test_a_read_only_wal_or_shm_file_left_by_an_older_version_is_named(shared_directory: Path) -> None:
    """Item 7: a -shm another run left read-only refuses writes whatever the file's mode: say which file."""
    path = shared_directory / "state.db"
    url = f"sqlite:///{path}"
    database.upgrade(url)
    shm = shared_directory / "state.db-shm"
    shm.write_bytes(b"")
    shm.chmod(0o444)
    owner = as_user_who_owns(shared_directory)
    done = subprocess.run(
        [*owner, COMMAND, "run"], env=cli_env(url), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"audience-sync: the state database (sqlite file {path}) refuses writes: this user cannot write "
        f"{shm} (mode 0444); make it writable (chmod u+w) or run as its owner"
    )


def test_forget_of_an_id_no_connection_holds_says_so_sends_nothing_and_exits_1(
    state_url: str, config: Config, customers: Customers
) -> None:
    """Item 8: `forget U00001` (the id is u00001) said "removed from the state tables" and exited 0."""
    customers.add("u00001", "U00002")
    with SegmentServer(api_key="k") as segment:
        config.connect(config.audience("VIP", Customers.QUERY), segment_destination(config, segment))
        assert run_cli(state_url, "initial").returncode == 0
        sent = len(segment.messages)
        wrong_case = run_cli(state_url, "forget", "U00001")
        dry_run = run_cli(state_url, "forget", "U00001", "--dry-run")
        unknown = run_cli(state_url, "forget", "nobody")
        assert len(segment.messages) == sent

    near = " (user ids are case-sensitive; the state holds 'u00001')"
    for done, user_id, held in (
        (wrong_case, "U00001", near),
        (dry_run, "U00001", near),
        (unknown, "nobody", ""),
    ):
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert done.stderr.splitlines()[-1] == (
            f"no connection holds user {user_id!r}: nothing was sent or removed{held}"
        )
    kept = config.sql("SELECT user_id FROM sync_state")
    assert sorted(user_id for (user_id,) in kept) == ["U00002", "u00001"]


@pytest.mark.parametrize("parameter", ["password", "PWD", "passwd", "sslpassword", "Token"])
def test_a_password_in_a_source_url_query_string_is_refused_like_one_in_its_userinfo(
    state_url: str, config: Config, parameter: str
) -> None:
    """Item 9: the row is a problem of its audiences, the value shown nowhere; `url_env` is the way."""
    source = add_source(
        config, "shop", url=f"postgresql://reader@127.0.0.1:{free_port()}/shop?{parameter}=hunter2"
    )
    # a parameter that holds no secret is no problem: that source is used, and answers it cannot connect
    add_source(config, "plain", url=f"postgresql://reader@127.0.0.1:{free_port()}/shop?sslmode=disable")
    shop = config.audience("On shop", "SELECT 1 AS user_id", source="shop")
    config.audience("On plain", "SELECT 1 AS user_id", source="plain")
    with SegmentServer(api_key="k") as segment:
        config.connect(shop, segment_destination(config, segment))
        synced = run_cli(state_url, "run")
        checked = run_cli(state_url, "check")
        status = run_cli(state_url, "status", "--json")

    assert "hunter2" not in everything_printed(synced, checked, status)
    message = (
        f"audience 'On shop' (id {shop}): sources row id={source} ('shop'): url holds a password; put the "
        "URL in an environment variable and its name in url_env"
    )
    runs = config.sql("SELECT outcome, error FROM sync_runs WHERE audience_id = :a", a=shop)
    assert [tuple(run) for run in runs] == [("invalid", message)]
    assert checked.returncode == 2 and message in checked.stdout.splitlines(), checked.stdout
    assert "'plain'" in checked.stdout and "url holds a password" not in checked.stdout.replace(message, "")
    assert segment.messages == []
