"""Safehold's own private temp space (issue 20.9).

Some steps need a file on the worker's disk: a SQLite snapshot (plaintext, even when the
backup is encrypted), a drill's throwaway database, a MySQL client option file holding a
password, an upload being validated. They all go in `<tmp>/safehold-<uid>/` (mode 0700,
owned by this user — refused otherwise), each in a directory of its own
(`<kind>-<pid>-<random>`, 0700; files 0600) whose `.lock` its process holds locked
(flock) while it uses it. A process killed with SIGKILL cannot clean up, but the kernel
drops its lock, so `sweep()` (run when a worker or the API starts, and by the worker's
housekeeping) removes every directory whose lock is free — a pid reused in a restarted
container changes nothing.

Big work that a server running as another user must reach (a scratch MariaDB's or
PostgreSQL's data directory, staged binlog or WAL, a streamer's spool) goes in
`<tmp>/safehold-<kind>-<pid>-<random>/work` instead (`work_dir`): the outer directory is
ours (0711: passed through, not listed) and holds the `.lock`, so `sweep()` removes what a
killed worker left there too.

`<tmp>` is `$TMPDIR` or `/tmp`; put it on an encrypted or memory-backed filesystem if
plaintext must never touch a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from shared.errors import ConfigError

log = logging.getLogger("safehold.scratch")


def root() -> Path:
    """The private temp root, created 0700 if missing; refused if someone else owns it or
    it is not a plain directory (a planted symlink)."""
    path = Path(tempfile.gettempdir()) / f"safehold-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(f"{path} is not a directory owned by this user; Safehold keeps "
                          "its temp files there: remove it (or set TMPDIR elsewhere)")
    if stat.S_IMODE(st.st_mode) != 0o700:
        path.chmod(0o700)
    return path


LOCK = ".lock"


@contextlib.contextmanager
def private_dir(kind: str) -> Iterator[Path]:
    """A fresh 0700 directory for this process's temp files, locked while in use and
    removed afterwards."""
    path = root() / f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


WORK_KINDS = ("scratch", "binlog-pitr", "pitr", "wal", "binlog", "base")
_WORK = re.compile("safehold-(?:" + "|".join(map(re.escape, WORK_KINDS)) +
                   r")-[0-9]+-[0-9a-f]{8}\Z")


@contextlib.asynccontextmanager
async def work_dir(kind: str) -> AsyncIterator[Path]:
    """A fresh 0700 `work` directory under `<tmp>/safehold-<kind>-<pid>-<random>/` (the
    outer one ours, 0711, locked while in use), removed afterwards; what a SIGKILLed
    process left is swept."""
    assert kind in WORK_KINDS, kind
    outer = Path(tempfile.gettempdir()) / f"safehold-{kind}-{os.getpid()}-" \
                                          f"{secrets.token_hex(4)}"

    def make() -> int:
        outer.mkdir(mode=0o700)
        fd = os.open(outer / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        outer.chmod(0o711)
        (outer / "work").mkdir(mode=0o700)
        return fd
    fd = await asyncio.to_thread(make)
    try:
        yield outer / "work"
    finally:
        await asyncio.to_thread(shutil.rmtree, outer, True)
        os.close(fd)


def private_file(directory: Path, name: str) -> Path:
    """An empty file created 0600 (for tools that open an existing file)."""
    path = directory / name
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def _in_use(directory: Path) -> bool:
    """Whether a live process holds the directory's lock (one without a lock file: while
    it is being made, for a minute)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            return time.time() - directory.stat().st_mtime < 60
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # free, but maybe made a moment ago by a process about to lock it
        return time.time() - os.fstat(fd).st_mtime < 10
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing drops a lock taken here)


def sweep() -> list[str]:
    """Remove what dead processes left in the private temp root; the names removed."""
    try:
        base = root()
    except (OSError, ConfigError) as exc:
        log.warning("cannot sweep Safehold's temp files: %s", exc)
        return []
    removed = []
    for entry in base.iterdir():
        if not entry.is_dir() or entry.is_symlink() or _in_use(entry):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    for entry in base.parent.iterdir():  # work directories (`work_dir`)
        with contextlib.suppress(OSError):
            st = entry.lstat()
            if not _WORK.match(entry.name) or not stat.S_ISDIR(st.st_mode) or \
                    st.st_uid != os.geteuid() or not (entry / LOCK).is_file() or \
                    _in_use(entry):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        log.warning("removed %d temp director%s left by dead processes: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed
