"""Safehold's own private temp space (issue 20.9).

Some steps need a file on the worker's disk: a SQLite snapshot (plaintext, even when the
backup is encrypted), a drill's throwaway database, a MySQL client option file holding a
password, an upload being validated. They all go in `<tmp>/safehold-<uid>/` (mode 0700,
owned by this user — refused otherwise), each in a directory named after the process that
made it (`<kind>-<pid>-<random>`, 0700; files 0600). A process killed with SIGKILL cannot
clean up, so `sweep()` (run when a worker or the API starts, and by the worker's
housekeeping) removes the directories of processes that are gone.

`<tmp>` is `$TMPDIR` or `/tmp`; put it on an encrypted or memory-backed filesystem if
plaintext must never touch a disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def private_dir(kind: str) -> Iterator[Path]:
    """A fresh 0700 directory for this process's temp files, removed afterwards."""
    path = root() / f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def private_file(directory: Path, name: str) -> Path:
    """An empty file created 0600 (for tools that open an existing file)."""
    path = directory / name
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Remove what dead processes left in the private temp root; the names removed."""
    try:
        base = root()
    except (OSError, ConfigError) as exc:
        log.warning("cannot sweep Safehold's temp files: %s", exc)
        return []
    removed = []
    for entry in base.iterdir():
        try:
            pid = int(entry.name.split("-")[-2])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        log.warning("removed %d temp director%s left by dead processes: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed
