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
import contextlib
import dataclasses
import hashlib
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from shared import codecs, naming
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import IntegrityError, PipelineError, RestoreFailed, SafeholdError
from shared.jobs import Job, Phase, now_iso
from shared.manifests import ManifestDoc
from shared.pitr_window import ArchivedBase, ArchivedPiece, bases, pieces, runs
from shared.storage.base import BackupStore
from worker import pipeline
from worker.engines import Engine, pg_pitr
from worker.engines.pg_connection import conn_params
from worker.procedures.restore import RestoreResult, Restores
from worker.procedures.verify import DrillRecord
from worker.progress import Progress


def when_of(value: str) -> datetime | None:
    """A point in time as submitted ("latest": None)."""
    if value == "latest":
        return None
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if at.tzinfo is None:
        raise ValueError("a point in time needs its zone (…Z or +hh:mm)")
    return at.astimezone(UTC)


@dataclasses.dataclass(frozen=True)
class PointBackup:
    """A regular backup of the target's database as it was at an instant, dumped from a
    scratch server recovered from the archive."""

    filename: str
    sha256: str
    base: ArchivedBase
    at: datetime | None  # None: the archive's end


class PitrRestores(Restores):
    async def restore_to_time(self, job: Job, target: TargetConfig, engine: Engine,
                              progress: Progress, identities: Sequence[AgeKey] = ()
                              ) -> RestoreResult:
        asked = str(job.params.get("point_in_time", ""))
        progress.plan = {Phase.RECOVERING: (0, 30), Phase.DUMPING: (30, 45),
                         Phase.VERIFYING: (45, 50), Phase.SAFETY_BACKUP: (50, 70),
                         Phase.RESTORING: (70, 100)}
        made = await self._point_backup(job, target, engine, progress, asked, identities,
                                        "point in time")
        params = job.params.copy()
        params["backup"], params["sha256"] = made.filename, made.sha256
        result = await self.restore(dataclasses.replace(job, params=params), target, engine,
                                    progress, identities)
        result["warnings"] = [f"restored to {asked} through {made.filename}",
                              *(result["warnings"] or [])]
        return result

    async def drill_to_time(self, job: Job, target: TargetConfig, engine: Engine,
                            progress: Progress, identities: Sequence[AgeKey] = ()
                            ) -> DrillRecord:
        """A PITR drill: an instant of the window (`point_in_time`; "random": anywhere
        in it, as a scheduled drill picks) recovered in a scratch server, dumped, and that
        dump drilled like any backup (restored into a scratch database, exact counts
        compared with the dump's, `verify_checks` run) — the path a restore to that instant
        takes, short of the live database. RTO is from the start to the scratch copy
        loaded. The outcome is recorded on the base it started from (the window shows it)
        and the intermediate dump is deleted."""
        t0 = time.monotonic()
        asked = str(job.params.get("point_in_time") or "random")
        progress.plan = {Phase.RECOVERING: (0, 40), Phase.DUMPING: (40, 60),
                         Phase.VERIFYING: (60, 65), Phase.RESTORING: (65, 95),
                         Phase.CHECKING: (95, 100)}
        made = await self._point_backup(job, target, engine, progress, asked, identities,
                                        "PITR drill to")
        recovered_s = time.monotonic() - t0
        at = made.at.isoformat(timespec="milliseconds").replace("+00:00", "Z") \
            if made.at else "latest"
        facts: dict[str, object] = {"point_in_time": at, "base": made.base.filename,
                                    "job": job.id, "at": now_iso()}
        archive = target.id + naming.PITR_SUFFIX
        try:
            record = await self.verify(
                dataclasses.replace(job, params={"backup": made.filename}), target, engine,
                progress, identities, keep_plan=True)
        except SafeholdError as exc:
            with contextlib.suppress(Exception):
                await self.catalog.annotate(archive, naming.parse_archive(made.base.filename),
                                            {"last_drill": {**facts, "outcome": "failed",
                                                            "error": exc.code}})
            raise
        finally:
            with contextlib.suppress(Exception):  # a by-product: the drill was of the archive
                await self.catalog.delete(target.id, naming.parse(made.filename))
        record["rto_s"] = round(recovered_s + float(record.get("rto_s") or 0), 3)
        record["duration_s"] = round(time.monotonic() - t0, 3)
        record["point_in_time"] = at
        record["base"] = made.base.filename
        record["mode"] = "pitr-scratch-recovery"
        await self.catalog.annotate(archive, naming.parse_archive(made.base.filename), {
            "last_drill": {**facts, "outcome": record.get("outcome", "passed"),
                           "rto_s": record["rto_s"]}})
        return record

    async def _point_backup(self, job: Job, target: TargetConfig, engine: Engine,
                            progress: Progress, asked: str, identities: Sequence[AgeKey],
                            note: str) -> PointBackup:
        """The target's database at `asked` (an instant, "latest", or "random") as a
        regular backup: the newest base consistent before it and the archived WAL after it,
        verified, recovered in a scratch server and dumped."""
        if target.pitr is None or not target.pitr.enabled:
            raise RestoreFailed(f"target '{target.id}' has no point-in-time recovery",
                                database_unchanged=True, code="pitr_not_enabled")
        archive = target.id + naming.PITR_SUFFIX
        listing = await self.catalog.list_backups(archive)
        found = runs(pieces(listing))
        last = found[-1] if found else None
        if last is None or last.covers_until is None:
            raise RestoreFailed(f"target '{target.id}' has no archived WAL yet",
                                database_unchanged=True, code="outside_window")
        covered = [b for b in bases(listing) if b.timeline == last.timeline
                   and last.start <= b.start and b.end <= last.end
                   and b.consistent_at <= last.covers_until]
        if asked == "random" and covered:
            first = min(b.consistent_at for b in covered)
            at: datetime | None = first + (last.covers_until - first) * random.random()
        else:
            at = when_of(asked) if asked != "random" else None
        stop = at if at is not None else last.covers_until
        usable = [b for b in covered if b.consistent_at <= stop]
        if not usable or stop > last.covers_until:
            earliest = min((b.consistent_at for b in covered), default=None)
            raise RestoreFailed(
                f"{asked} is outside the recovery window of '{target.id}' (from "
                f"{earliest.isoformat() if earliest else 'no base yet'} to "
                f"{last.covers_until.isoformat()}); nothing was changed",
                database_unchanged=True, code="outside_window")
        base = max(usable, key=lambda b: b.consistent_at)
        ids = list(identities) + self.identities(target)
        progress.set_phase(Phase.RECOVERING)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="safehold-pitr-"))
        try:
            filename, sha256 = await self._recover_and_dump(
                job, target, engine, progress, base,
                [p for p in pieces(listing) if p.timeline == last.timeline
                 and p.end > base.start and p.start < last.end], at, work, ids, note)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return PointBackup(filename, sha256, base, at)

    async def _recover_and_dump(self, job: Job, target: TargetConfig, engine: Engine,
                                progress: Progress, base: ArchivedBase,
                                wal: list[ArchivedPiece], at: datetime | None, work: Path,
                                ids: Sequence[AgeKey], note: str) -> tuple[str, str]:
        tools = await pg_pitr.bindir(target)
        archive = target.id + naming.PITR_SUFFIX
        data, staged = work / "data", work / "wal"
        await asyncio.to_thread(staged.mkdir)
        async def unpack(chunks: AsyncIterator[bytes]) -> None:
            await pg_pitr.untar(chunks, data)

        async def emptied() -> None:
            await asyncio.to_thread(shutil.rmtree, data, True)
        await self._read(archive, base.filename, ids, unpack, emptied)
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
                note=f"{note} {at.isoformat() if at else 'latest'}: base "
                     f"{base.filename}, WAL to {pg_pitr.lsn_text(wal[-1].end) if wal else '-'}")
        return made["filename"], made["sha256"]

    async def _read(self, archive: str, filename: str, ids: Sequence[AgeKey],
                    consume: Callable[[AsyncIterator[bytes]], Awaitable[None]],
                    reset: Callable[[], Awaitable[None]] | None = None) -> None:
        """Give `consume` an archive object's plain bytes from its first sound copy: the
        stored sha256 is checked as it streams (a codec usually breaks before the digest is
        reached) and the plain sha256 at the end. A copy found damaged is marked so
        (`read_failed`: listed as damaged from then on, so the window shows the hole until
        it is archived again) and the next destination's copy is read after `reset`; with
        none left the restore stops before changing anything (archive_damaged)."""
        name = naming.parse_archive(filename)
        problems: list[str] = []
        for store, manifest in await self.catalog.copies(archive, name):
            plain = hashlib.sha256()

            async def checked(store: BackupStore = store, manifest: ManifestDoc = manifest,
                              plain: hashlib._Hash = plain) -> AsyncIterator[bytes]:
                async for chunk in pipeline.stored_plain(
                        _opened(store, archive, filename), codecs.chain_of(manifest),
                        expect_sha256=str(manifest.get("sha256")), identities=ids):
                    plain.update(chunk)
                    yield chunk
            try:
                await consume(checked())
                recorded = manifest.get("plain_sha256")
                if isinstance(recorded, str) and recorded != plain.hexdigest():
                    raise IntegrityError("its content is not what was archived")
                return
            except (PipelineError, IntegrityError) as exc:
                if exc.code in ("wrong_identity", "identity_required"):
                    raise RestoreFailed(exc.message, database_unchanged=True,
                                        code=exc.code) from None
                problems.append(f"{store.name}: {exc.message}")
                with contextlib.suppress(Exception):
                    await store.annotate(archive, filename, {"read_failed": {
                        "at": now_iso(), "why": exc.message[:300]}})
                if reset is not None:
                    await reset()
        raise RestoreFailed(f"the archive object {filename} is damaged on every destination "
                            f"({'; '.join(problems)[:600]}); the restore stopped before "
                            "changing anything", database_unchanged=True,
                            code="archive_damaged")

    async def _stage(self, archive: str, wal: list[ArchivedPiece], staged: Path,
                     ids: Sequence[AgeKey]) -> list[Path]:
        """Each WAL segment under its own name, as restore_command fetches it: a whole
        segment as archived, or its parts written at their offsets (the rest zeros, where
        recovery ends)."""
        out: dict[str, Path] = {}
        for p in wal:
            path = staged / p.segment
            if p.segment not in out:
                await asyncio.to_thread(pg_pitr.zero_file, path, p.seg_bytes)
                out[p.segment] = path
            offset = p.start - pg_pitr.segment_start(p.segment, p.seg_bytes)

            async def write(chunks: AsyncIterator[bytes], path: Path = path,
                            offset: int = offset) -> None:
                with open(path, "r+b") as f:  # noqa: ASYNC230 - local disk, small writes
                    f.seek(offset)
                    async for chunk in chunks:
                        await asyncio.to_thread(f.write, chunk)
            await self._read(archive, p.filename, ids, write)
        return list(out.values())


async def _opened(store: BackupStore, target: str, filename: str
                  ) -> AsyncIterator[bytes]:
    async for chunk in store.open(target, filename):
        yield chunk
