"""A restore to a point in time (PostgreSQL targets with PITR, issue 24).

The newest base backup consistent before T and the archived WAL after it are verified
(sha256 of every object, then of its plain bytes) and staged in a private work directory;
a scratch server of the target's major version, unprivileged, on a private socket only,
recovers them to T (`recovery_target_time`, inclusive; to the end of the archive when no
commit in it is later than T, since PostgreSQL refuses a target it never passes). The
target's database is then dumped from that scratch server into a regular backup (its note
says which instant, base and WAL) and restored through the ordinary restore — verified
input, the safety backup first, one transaction, rollback, honest `database_state`. The
live database is untouched until that last step; the scratch server and its files are
always removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from shared import codecs, naming
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import PipelineError, RestoreFailed
from shared.jobs import Job, Phase
from shared.pitr_window import ArchivedBase, ArchivedPiece, bases, pieces, runs
from shared.storage.base import BackupStore
from worker import pipeline
from worker.engines import Engine, pg_pitr
from worker.engines.pg_connection import conn_params
from worker.procedures.restore import RestoreResult, Restores
from worker.progress import Progress


def when_of(value: str) -> datetime | None:
    """A point in time as submitted ("latest": None)."""
    if value == "latest":
        return None
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if at.tzinfo is None:
        raise ValueError("a point in time needs its zone (…Z or +hh:mm)")
    return at.astimezone(UTC)


class PitrRestores(Restores):
    async def restore_to_time(self, job: Job, target: TargetConfig, engine: Engine,
                              progress: Progress, identities: Sequence[AgeKey] = ()
                              ) -> RestoreResult:
        if target.pitr is None or not target.pitr.enabled:
            raise RestoreFailed(f"target '{target.id}' has no point-in-time recovery",
                                database_unchanged=True, code="pitr_not_enabled")
        asked = str(job.params.get("point_in_time", ""))
        at = when_of(asked)
        archive = target.id + naming.PITR_SUFFIX
        listing = await self.catalog.list_backups(archive)
        found = runs(pieces(listing))
        last = found[-1] if found else None
        if last is None or last.covers_until is None:
            raise RestoreFailed(f"target '{target.id}' has no archived WAL yet",
                                database_unchanged=True, code="outside_window")
        stop = at if at is not None else last.covers_until
        usable = [b for b in bases(listing) if b.timeline == last.timeline
                  and last.start <= b.start and b.end <= last.end
                  and b.consistent_at <= stop]
        if not usable or stop > last.covers_until:
            earliest = min((b.consistent_at for b in usable), default=None)
            raise RestoreFailed(
                f"{asked} is outside the recovery window of '{target.id}' (from "
                f"{earliest.isoformat() if earliest else 'no base yet'} to "
                f"{last.covers_until.isoformat()}); nothing was changed",
                database_unchanged=True, code="outside_window")
        base = max(usable, key=lambda b: b.consistent_at)
        ids = list(identities) + self.identities(target)
        progress.plan = {Phase.RECOVERING: (0, 30), Phase.DUMPING: (30, 45),
                         Phase.VERIFYING: (45, 50), Phase.SAFETY_BACKUP: (50, 70),
                         Phase.RESTORING: (70, 100)}
        progress.set_phase(Phase.RECOVERING)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="safehold-pitr-"))
        try:
            made = await self._recover_and_dump(job, target, engine, progress, base,
                                                [p for p in pieces(listing)
                                                 if p.timeline == last.timeline
                                                 and p.end > base.start and p.start < last.end],
                                                at, work, ids)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        params = job.params.copy()
        params["backup"], params["sha256"] = made
        result = await self.restore(dataclasses.replace(job, params=params), target, engine,
                                    progress, identities)
        result["warnings"] = [f"restored to {asked} through {made[0]}",
                              *(result["warnings"] or [])]
        return result

    async def _recover_and_dump(self, job: Job, target: TargetConfig, engine: Engine,
                                progress: Progress, base: ArchivedBase,
                                wal: list[ArchivedPiece], at: datetime | None, work: Path,
                                ids: Sequence[AgeKey]) -> tuple[str, str]:
        tools = await pg_pitr.bindir(target)
        archive = target.id + naming.PITR_SUFFIX
        data, staged = work / "data", work / "wal"
        await asyncio.to_thread(staged.mkdir)
        await pg_pitr.untar(self._fetch(archive, base.filename, ids), data)
        segments = await self._stage(archive, wal, staged, ids)
        newest = await pg_pitr.last_commit(tools, segments)
        # past the archive's last commit there is nothing to stop before: replay it all
        stop = at if at is not None and newest is not None and at < newest else None
        async with pg_pitr.recovered(tools, work, data, staged, stop) as (sock, port):
            c = conn_params(target)
            scratch = dataclasses.replace(
                target, password=None, pitr=None,
                url=f"postgresql://{quote(c['user'], safe='')}@localhost:{port}/"
                    f"{quote(c['database'], safe='')}?host={quote(str(sock), safe='')}")
            made = await self.backup(
                job, scratch, engine, progress, kind="backup", compress=True,
                note=f"point in time {at.isoformat() if at else 'latest'}: base "
                     f"{base.filename}, WAL to {pg_pitr.lsn_text(wal[-1].end) if wal else '-'}")
        return made["filename"], made["sha256"]

    async def _fetch(self, archive: str, filename: str, ids: Sequence[AgeKey]
                     ) -> AsyncIterator[bytes]:
        """An archive object's plain bytes, its stored sha256 checked as it streams (and
        its plain sha256, when recorded, at the end)."""
        name = naming.parse_archive(filename)
        store, manifest = (await self.catalog.copies(archive, name))[0]
        plain = hashlib.sha256()
        try:
            async for chunk in pipeline.stored_plain(
                    _opened(store, archive, filename), codecs.chain_of(manifest),
                    expect_sha256=str(manifest.get("sha256")), identities=ids):
                plain.update(chunk)
                yield chunk
        except PipelineError as exc:  # a codec often breaks before the digest is reached
            raise RestoreFailed(f"the archive object {filename} on {store.name} is damaged "
                                f"({exc.message}); the restore stopped before changing "
                                "anything", database_unchanged=True,
                                code="archive_damaged") from None
        recorded = manifest.get("plain_sha256")
        if isinstance(recorded, str) and recorded != plain.hexdigest():
            raise RestoreFailed(f"{filename}: its content is not what was archived",
                                database_unchanged=True, code="checksum_mismatch")

    async def _stage(self, archive: str, wal: list[ArchivedPiece], staged: Path,
                     ids: Sequence[AgeKey]) -> list[Path]:
        """Each WAL segment under its own name, as restore_command fetches it: a whole
        segment as archived, or its parts written at their offsets (the rest zeros, where
        recovery ends)."""
        out: dict[str, Path] = {}
        for p in wal:
            path = staged / p.segment
            if p.segment not in out:
                await asyncio.to_thread(_zeros, path, p.seg_bytes)
                out[p.segment] = path
            offset = p.start - pg_pitr.segment_start(p.segment, p.seg_bytes)
            chunks = bytearray()
            async for chunk in self._fetch(archive, p.filename, ids):
                chunks += chunk
            await asyncio.to_thread(_write_at, path, offset, bytes(chunks))
        return list(out.values())


async def _opened(store: BackupStore, target: str, filename: str
                  ) -> AsyncIterator[bytes]:
    async for chunk in store.open(target, filename):
        yield chunk


def _zeros(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
