"""`safehold pitr restore-cluster TARGET --to T --data-dir D`: whole-server disaster
recovery from a target's PITR archive, as `pgbackrest restore` does it — a data directory
that starts as the server was at T.

It reads the archive straight from the target's destinations with the config's
credentials (no API, no Redis, no worker: the server they ran beside may be the one that
was lost). The newest base consistent before T is checked (stored and plain sha256) and
unpacked into D, the WAL from its start on is checked and staged in
D/safehold_restore_wal, and recovery is requested (recovery.signal, and in
postgresql.auto.conf a `restore_command` reading that directory, `recovery_target_time`
inclusive, `recovery_target_action = promote`). Start PostgreSQL of the same major
version on D: it replays to T, promotes, and is the server as it was then. Nothing is
written outside D; D must be empty or new; on any failure what was written into D is
removed again."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from shared import codecs, naming
from shared.config import Settings
from shared.errors import BadRequest, ConfigError
from shared.storage.catalog import Catalog
from worker.archive_read import ArchiveReader, choose, when_of
from worker.engines import pg_pitr

WAL_DIR = "safehold_restore_wal"


async def restore_cluster(settings: Settings, target_id: str, asked: str, data_dir: Path,
                          *, pg_bindir: str | None = None, owner: str | None = None,
                          say: Callable[[str], None] = print) -> dict[str, object]:
    """Write the startable data directory; returns what was restored (base, WAL, target
    time, tools)."""
    target = settings.targets.get(target_id)
    if target is None:
        raise ConfigError(f"no target '{target_id}' in {settings.source} (configured: "
                          f"{', '.join(settings.targets) or 'none'})")
    if target.pitr is None:
        raise ConfigError(f"target '{target_id}' has no [targets.{target_id}.pitr]: it has "
                          "no archive to restore a cluster from")
    if target.engine != "postgresql":
        raise ConfigError(f"restore-cluster writes a PostgreSQL data directory; target "
                          f"'{target_id}' is {target.engine}: restore it to an instant with "
                          "`safehold pitr restore TARGET --to T`")
    try:
        when_of(asked)
    except ValueError:
        raise BadRequest("--to is an RFC 3339 instant with its zone (2026-12-07T10:15:00Z) "
                         "or \"latest\"", code="invalid_point_in_time") from None
    data_dir, created = await asyncio.to_thread(_fresh, data_dir)
    catalog = Catalog(settings)
    try:
        archive = target.id + naming.PITR_SUFFIX
        plan = choose(await catalog.list_backups(archive), asked, target.id)
        enc = target.encryption
        ids = codecs.identities_from_file(enc.identity_file) \
            if enc is not None and enc.identity_file else []
        reader = ArchiveReader(catalog, archive, ids)
        say(f"base {plan.base.filename} (consistent at {plan.base.consistent_at.isoformat()})"
            f", {len(plan.wal)} WAL objects after it")
        await asyncio.to_thread(data_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        await reader.unpack_base(plan.base, data_dir)
        wal = data_dir / WAL_DIR
        await asyncio.to_thread(wal.mkdir, mode=0o700)
        segments = await reader.stage(plan.wal, wal)
        major = int((await asyncio.to_thread((data_dir / "PG_VERSION").read_text)).strip())
        tools = Path(pg_bindir) if pg_bindir else await pg_pitr.tools_of(major, "--pg-bindir")
        newest = await pg_pitr.last_commit(tools, segments)
        # past the archive's last commit PostgreSQL would never reach T: replay it all
        stop = plan.at if plan.at is not None and newest is not None and plan.at < newest \
            else None
        user = owner or _default_owner()
        await asyncio.to_thread(_request_recovery, data_dir, wal, stop, user)
    except BaseException:
        await asyncio.to_thread(_undo, data_dir, created)
        raise
    finally:
        await catalog.close()
    say(f"wrote {data_dir}: PostgreSQL {major} recovers to "
        f"{stop.isoformat() if stop else 'the end of the archive'} when started, e.g.\n"
        f"  {'runuser -u ' + user + ' -- ' if user else ''}{tools / 'pg_ctl'} -D {data_dir} "
        f"-o '-c port=5432' start\n"
        f"then remove {wal} once it has promoted (SELECT pg_is_in_recovery() is false)")
    return {"data_dir": str(data_dir), "base": plan.base.filename,
            "wal_objects": len(plan.wal), "recovery_target_time":
            stop.isoformat() if stop else None, "major": major, "owner": user}


def _fresh(data_dir: Path) -> tuple[Path, bool]:
    """`data_dir` made absolute, once it is new or empty (and whether it is new)."""
    data_dir = data_dir.absolute()
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BadRequest(f"{data_dir} is not an empty directory: restore-cluster writes "
                         "into a new or empty one only", code="data_dir_not_empty")
    return data_dir, not data_dir.exists()


def _default_owner() -> str | None:
    """Root's data directory is handed to `postgres` (the server refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


def _request_recovery(data: Path, wal: Path, stop: datetime | None, user: str | None
                      ) -> None:
    """recovery.signal and the recovery settings (appended to postgresql.auto.conf: later
    lines win); the live server's pid and standby files removed; a minimal
    postgresql.conf / pg_hba.conf where the server kept its own elsewhere (Debian keeps them
    in /etc, outside the data directory)."""
    for leftover in ("postmaster.pid", "postmaster.opts", "standby.signal"):
        (data / leftover).unlink(missing_ok=True)
    if not (data / "postgresql.conf").exists():
        (data / "postgresql.conf").write_text(
            "# written by safehold pitr restore-cluster: the source server kept its\n"
            "# configuration outside its data directory; put yours here\n")
    if not (data / "pg_hba.conf").exists():
        (data / "pg_hba.conf").write_text(
            "# written by safehold pitr restore-cluster\nlocal all all peer\n")
    lines = ["", "# safehold pitr restore-cluster: recover from the staged archive",
             f"restore_command = 'cp \"{wal}/%f\" \"%p\"'",
             "recovery_target_action = 'promote'"]
    if stop is not None:
        lines += [f"recovery_target_time = '{stop.isoformat()}'",
                  "recovery_target_inclusive = on"]
    with open(data / "postgresql.auto.conf", "a") as f:
        f.write("\n".join(lines) + "\n")
    (data / "recovery.signal").write_text("")
    os.chmod(data, 0o700)
    if user is not None:
        for p in [data, *data.rglob("*")]:
            shutil.chown(p, user, user)


def _undo(data: Path, created: bool) -> None:
    if created:
        shutil.rmtree(data, ignore_errors=True)
    elif data.exists():
        for child in data.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
