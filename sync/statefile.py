"""The SQLite state file's modes: it holds `api_key` values and member emails.

It is created readable by its owner only (SQLite gives the -wal and -shm files it makes the file's mode), a
file this process cannot write is refused before SQLite opens it, and `check` warns about one that other users
can read.
"""

import os
import stat
from pathlib import Path

from sync.errors import StateError

PRIVATE = 0o600
# the files SQLite makes beside a database in WAL mode, with the database file's mode and this process's user
COMPANIONS = ("-wal", "-shm")


def create_private(path: Path | None) -> None:
    """An empty state file (a new SQLite database) readable and writable by its owner only, whatever the
    umask; an existing file is left as it is (None: an in-memory database)."""
    if path is None:
        return
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
    except OSError:  # there already, or a directory that is not there: SQLite opens it or says why
        return
    try:
        os.fchmod(descriptor, PRIVATE)  # the umask may have taken bits from the mode asked for
    finally:
        os.close(descriptor)


def check_writable(path: Path | None) -> None:
    """Refuse a state file (or the -wal or -shm beside it) this process cannot write, before SQLite opens it:
    SQLite would leave -wal and -shm files as unwritable as the file, owned by this user, and they would
    refuse every run after the file's mode is fixed."""
    if path is None:
        return
    for file in (path, *(path.with_name(path.name + suffix) for suffix in COMPANIONS)):
        if file.exists() and not os.access(file, os.W_OK):
            mode = stat.S_IMODE(file.stat().st_mode)
            raise StateError(
                f"the state database (sqlite file {path}) refuses writes: this user cannot write {file} "
                f"(mode {mode:04o}); make it writable (chmod u+w) or run as its owner"
            )


def readable_by_others(path: Path | None) -> list[str]:
    """A warning when users other than the state file's owner can read it."""
    if path is None or not path.exists():
        return []
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return []
    return [
        f"the state database file {path} can be read by other users (mode {mode:04o}): it holds api_key "
        f"values and member emails; chmod 600 {path} (and its -wal and -shm), and run with umask 077"
    ]
