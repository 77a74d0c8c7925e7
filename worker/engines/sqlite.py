"""SQLite: the online backup API out, an integrity-checked atomic file replace in.

Backup: `sqlite3.Connection.backup` copies the live database into a private snapshot in one
read transaction (consistent while other processes write; in WAL mode writers are not even
blocked), then the snapshot file is streamed through the pipeline. The stored file is a
plain SQLite database: `gunzip -c backup.db.gz > app.db` restores it with no tool at all.

Restore: the stream is written to a temp file next to the target, fsynced, checked with
`PRAGMA integrity_check` and `foreign_key_check`, then the target's WAL is checkpointed and
the temp file atomically renamed over the target; stale `-wal`/`-shm` files are removed so
they cannot be replayed onto the new file. Until the rename, the target is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

from shared import scratch
from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import DumpFailed, EngineError, PipelineError, RestoreFailed
from shared.formats.sqlite import check_sqlite_file
from shared.jobs import Phase, RestoreStage
from shared.outage import RedisUnavailable
from worker.engines import NO_OPTIONS, Drill, Dump, DumpOptions, RestoreOptions, sqlite_tables
from worker.progress import Progress

CHUNK = 1 << 20


def _open(path: str, *, readonly: bool = True) -> sqlite3.Connection:
    if not Path(path).exists():
        raise EngineError(f"SQLite database {path} does not exist", code="target_unreachable")
    uri = f"file:{path}?mode={'ro' if readonly else 'rw'}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise EngineError(f"cannot open SQLite database {path}: {exc}",
                          code="target_unreachable") from None
    return conn


def _snapshot(source: str, dest: Path) -> dict[str, Any]:
    """Blocking: consistent copy of `source` into `dest`; returns manifest facts."""
    src = _open(source)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one snapshot
        finally:
            dst.close()
        facts = _facts(src)
    except sqlite3.Error as exc:
        raise DumpFailed(f"SQLite backup of {source} failed: {exc}") from None
    finally:
        src.close()
    return facts


def _facts(conn: sqlite3.Connection) -> dict[str, Any]:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name")]
    return {
        "server_version": sqlite3.sqlite_version,
        "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
        "user_version": conn.execute("PRAGMA user_version").fetchone()[0],
        "page_size": conn.execute("PRAGMA page_size").fetchone()[0],
        "counts": {t: conn.execute(f'SELECT count(*) FROM "{t.replace(chr(34), 2 * chr(34))}"'
                                   ).fetchone()[0] for t in tables},
        "count_kind": "rows",
    }


def _replace(target: str, new_file: Path) -> None:
    """Blocking: fold the target's WAL, swap the file in atomically, drop stale WAL/SHM."""
    tp = Path(target)
    if tp.exists():
        # the restored file keeps the database file's owner, group and mode: an application
        # running as another user must not lose access
        st = tp.stat()
        os.chmod(new_file, stat.S_IMODE(st.st_mode))
        with contextlib.suppress(PermissionError):
            os.chown(new_file, st.st_uid, st.st_gid)
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(target, timeout=30)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
    os.replace(new_file, tp)
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    fd = os.open(tp.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _take_in(chunks: AsyncIterator[bytes], path: Path, progress: Progress) -> None:
    """The backup's stream written to `path` (fsynced) and proven a sound SQLite database
    (`PRAGMA integrity_check`, `foreign_key_check`); the live database is not touched."""
    out = await asyncio.to_thread(open, path, "wb")
    try:
        try:
            async for chunk in chunks:
                await asyncio.to_thread(out.write, chunk)
                progress.bytes_done += len(chunk)
        except PipelineError as exc:
            raise RestoreFailed(f"reading the backup failed ({exc.message}); the database "
                                "was not touched", database_unchanged=True,
                                code=exc.code) from None
        await asyncio.to_thread(out.flush)
        await asyncio.to_thread(os.fsync, out.fileno())
    finally:
        await asyncio.to_thread(out.close)
    progress.set_phase(Phase.CHECKING)
    try:
        await asyncio.to_thread(check_sqlite_file, path)
    except ValueError as exc:
        raise RestoreFailed(f"the backup is not a sound SQLite database ({exc}); the "
                            "database was not touched", database_unchanged=True) from None


class SQLite:
    name: ClassVar[str] = "sqlite"
    extension: ClassVar[str] = ENGINES["sqlite"].extension
    atomic_restore: ClassVar[bool] = True

    async def ping(self, target: TargetConfig) -> None:
        conn = await asyncio.to_thread(_open, target.path)
        conn.close()

    @property
    def drill(self) -> SQLiteDrill:
        return SQLiteDrill()

    async def stats(self, target: TargetConfig) -> dict[str, object]:
        def collect() -> dict[str, Any]:
            conn = _open(target.path)
            try:
                facts = _facts(conn)
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
            finally:
                conn.close()
            return {
                "engine": self.name,
                "server_version": facts["server_version"],
                "path": target.path,
                "size_bytes": os.path.getsize(target.path),
                "page_size": facts["page_size"],
                "page_count": pages,
                "journal_mode": facts["journal_mode"],
                "user_version": facts["user_version"],
                "table_count": len(facts["counts"]),
                "tables": [{"name": t, "rows": n} for t, n in facts["counts"].items()],
            }

        return await asyncio.to_thread(collect)

    @asynccontextmanager
    async def dump(self, target: TargetConfig, progress: Progress,
                   options: DumpOptions | None = None) -> AsyncIterator[Dump]:
        progress.item_kind = "pages"
        progress.set_phase(Phase.SNAPSHOT)
        # plaintext on the worker's disk (even for an encrypted backup): in Safehold's
        # private 0700 temp space, the file 0600, swept if the worker is killed
        with scratch.private_dir("sqlite") as tmp:
            snap = scratch.private_file(tmp, "snapshot.db")
            facts = await asyncio.to_thread(_snapshot, target.path, snap)
            size = (await asyncio.to_thread(snap.stat)).st_size
            progress.set_phase(Phase.DUMPING, bytes_total=size)
            f = await asyncio.to_thread(open, snap, "rb")
            try:
                async def chunks() -> AsyncIterator[bytes]:
                    while block := await asyncio.to_thread(f.read, CHUNK):
                        yield block

                yield Dump(chunks(), {**facts, "tool": "sqlite3 online backup API",
                                      "tool_version": sqlite3.sqlite_version,
                                      "options": ["backup(pages=-1)"]})
            finally:
                await asyncio.to_thread(f.close)

    async def tables_present(self, target: TargetConfig, tables: Sequence[str]) -> list[str]:
        return await asyncio.to_thread(sqlite_tables.present, target.path, tables)

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        if options.tables:
            await self._restore_tables(target, chunks, progress, manifest, options.tables)
            return
        directory = Path(target.path).parent
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        fd, name = await asyncio.to_thread(
            tempfile.mkstemp, prefix=f".{Path(target.path).name}.safehold-restore-",
            dir=directory)
        temp = Path(name)
        os.close(fd)
        try:
            await _take_in(chunks, temp, progress)
            progress.set_phase(Phase.REPLACING)
            try:
                await progress.enter_stage(RestoreStage.COMMITTING)  # from here the file may be new
            except RedisUnavailable as exc:  # not replaced yet
                raise RestoreFailed(f"{exc.message}; the database was not touched",
                                    database_unchanged=True, code=exc.code) from None
            await asyncio.to_thread(_replace, target.path, temp)
        finally:
            for leftover in (temp, *(Path(f"{temp}{x}") for x in ("-wal", "-shm", "-journal"))):
                await asyncio.to_thread(leftover.unlink, missing_ok=True)

    async def _restore_tables(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                              progress: Progress, manifest: Mapping[str, object],
                              tables: Sequence[str]) -> None:
        """Some tables only (sqlite_tables): the backup goes to a private file, is
        checked, then attached read-only; the live file is changed in one transaction."""
        with scratch.private_dir("sqlite") as tmp:
            backup = scratch.private_file(tmp, "backup.db")
            await _take_in(chunks, backup, progress)
            progress.set_phase(Phase.RESTORING)
            try:
                await progress.enter_stage(RestoreStage.COMMITTING)
            except RedisUnavailable as exc:
                raise RestoreFailed(f"{exc.message}; the database was not touched",
                                    database_unchanged=True, code=exc.code) from None
            for said in await asyncio.to_thread(sqlite_tables.load, target.path, backup,
                                                tables, manifest, target.lock_timeout):
                progress.log(said)


class SQLiteDrill(Drill):
    """Restore drills: a temp file; exact counts of every table; user checks read-only."""

    @asynccontextmanager
    async def scratch(self, target: TargetConfig) -> AsyncIterator[TargetConfig]:
        from dataclasses import replace

        with scratch.private_dir("drill") as tmp:
            self.last_scratch = "a file in the worker's private temp space"
            yield replace(target, path=str(scratch.private_file(tmp, "drill.db")))

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        def count() -> dict[str, int]:
            conn = _open(target.path)
            try:
                return dict(_facts(conn)["counts"])
            finally:
                conn.close()
        return await asyncio.to_thread(count)

    async def check(self, target: TargetConfig, sql: str) -> bool:
        def run() -> bool:
            conn = _open(target.path)  # read-only
            try:
                row = conn.execute(sql).fetchone()
            finally:
                conn.close()
            return bool(row and row[0])
        return await asyncio.to_thread(run)
