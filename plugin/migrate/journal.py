"""The migration's journal, its parking places and the blocker files.

Everything lives in ``<data-root>/.strata-migrate/`` (``work_dir``)::

    journal.json     which two drivers, which one the root converges to, the phase
    home-<driver>    a driver Home while parked: its layers move between these two
                     (or, for a moment, a blocker file: see ``park``)

While the journal exists, each driver's live Home (``<data-root>/<driver>``) is a
*blocker*: a regular file where dockerd expects a directory.  overlay2's Init
then fails (its feature probe cannot make a directory in a file) and strata's
Init fails too (it also refuses outright while a journal exists), so dockerd
refuses to start on a half-migrated root on either driver.  A Home is swapped
with its blocker by one ``renameat2(RENAME_EXCHANGE)``: there is never a moment
with no entry at the live path, in which a starting dockerd could make a fresh,
empty Home.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

import msgspec

from plugin.errors import StrataError
from plugin.state.files import fsync_dir, write_atomic

WORK_DIR_NAME = ".strata-migrate"
BLOCKER_MAGIC = b"strata-migrate blocker\n"
#: What a parked or committed phase means: see ``plugin.migrate.steps``.
PHASES = ("parking", "moving", "committed")


class MigrationError(StrataError):
    """The migration cannot go on from the state it found (the message says why)."""


class Journal(msgspec.Struct):
    source: str   # the in-tree driver ("overlay2")
    name: str     # strata's driver name
    target: str   # the driver the root converges to: source (--back) or name
    phase: str    # one of PHASES
    started: float = 0.0


def work_dir(root: str) -> str:
    return os.path.join(root, WORK_DIR_NAME)


def journal_path(root: str) -> str:
    return os.path.join(work_dir(root), "journal.json")


def parked_home(root: str, driver: str) -> str:
    return os.path.join(work_dir(root), f"home-{driver}")


def live_home(root: str, driver: str) -> str:
    return os.path.join(root, driver)


def read_journal(root: str) -> Journal | None:
    try:
        with open(journal_path(root), "rb") as f:
            return msgspec.json.decode(f.read(), type=Journal)
    except FileNotFoundError:
        return None
    except msgspec.DecodeError as e:
        raise MigrationError(f"{journal_path(root)} is damaged ({e}); inspect it by hand") from e


def write_journal(root: str, journal: Journal) -> None:
    os.makedirs(work_dir(root), mode=0o700, exist_ok=True)
    write_atomic(journal_path(root), msgspec.json.encode(journal))


def new_journal(source: str, name: str, target: str) -> Journal:
    return Journal(source=source, name=name, target=target, phase="parking", started=time.time())


def unfinished(data_root: str) -> str | None:
    """A sentence for strata's Init when a migration of ``data_root`` is under way."""
    journal = journal_path(data_root)
    if not os.path.exists(journal):
        return None
    return (f"a `strata migrate` of {data_root} is unfinished ({journal} exists): "
            "rerun the same command to finish it, or add --back to undo it")


# ---- blockers ------------------------------------------------------------------------


def is_blocker(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(BLOCKER_MAGIC)) == BLOCKER_MAGIC
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def write_blocker(path: str) -> None:
    """A new blocker file at ``path`` (which must not exist)."""
    text = BLOCKER_MAGIC + (
        b"dockerd cannot use this driver while `strata migrate` is unfinished on this data\n"
        b"root; rerun it to finish, or run it with --back to undo.  See .strata-migrate/.\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def unlink_blocker(path: str) -> None:
    if is_blocker(path):
        os.unlink(path)
        fsync_dir(os.path.dirname(path))


def is_real_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


# ---- renameat2(RENAME_EXCHANGE) -------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def exchange(a: str, b: str) -> None:
    """Swap the entries ``a`` and ``b`` atomically (both must exist, same filesystem)."""
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                         _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise MigrationError(f"renameat2(RENAME_EXCHANGE) of {a} and {b} failed: "
                             f"{os.strerror(err)} (the filesystem must support it)")
    for parent in {os.path.dirname(a), os.path.dirname(b)}:
        fsync_dir(parent)
