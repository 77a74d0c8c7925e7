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
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from shared import naming, scratch
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import RestoreFailed, SafeholdError
from shared.jobs import Job, Phase, now_iso
from shared.pitr_window import ArchivedBase
from worker.archive_read import ArchiveReader, Recovery, choose
from worker.engines import Engine, pg_pitr
from worker.engines.pg_connection import conn_params
from worker.procedures.pitr_mysql import BinlogPitr
from worker.procedures.restore import RestoreResult
from worker.procedures.scoped import BESIDE, ScopedRestores
from worker.procedures.verify import DrillRecord
from worker.progress import Progress


@dataclasses.dataclass(frozen=True)
class PointBackup:
    """A regular backup of the target's database as it was at an instant, dumped from a
    scratch server recovered from the archive."""

    filename: str
    sha256: str
    base: ArchivedBase
    at: datetime | None  # None: the archive's end


class PitrRestores(ScopedRestores, BinlogPitr):
    async def restore_to_time(self, job: Job, target: TargetConfig, engine: Engine,
                              progress: Progress, identities: Sequence[AgeKey] = ()
                              ) -> RestoreResult:
        asked = str(job.params.get("point_in_time", ""))
        # into_target: the source target's state at T, loaded here
        target, dest = self.settings.target(str(job.params.get("from_target") or target.id)), \
            target
        progress.plan = {Phase.RECOVERING: (0, 30), Phase.DUMPING: (30, 45),
                         Phase.VERIFYING: (45, 50), Phase.SAFETY_BACKUP: (50, 70),
                         Phase.RESTORING: (70, 100)}
        if job.params.get("into_database") and dest.engine in BESIDE:
            await self.beside_checks(job, dest, engine)  # refused before the recovery
        if target.engine == "mysql":  # binlog replayed in a scratch server
            if target.pitr is None or not target.pitr.enabled:
                raise RestoreFailed(f"target '{target.id}' has no point-in-time recovery",
                                    database_unchanged=True, code="pitr_not_enabled")
            mine = await self.binlog_point_backup(job, target, engine, progress, asked,
                                                  identities, "point in time")
            filename, sha256, said = mine.filename, mine.sha256, list(mine.warnings)
        else:
            made = await self._point_backup(job, target, engine, progress, asked,
                                            identities, "point in time")
            filename, sha256, said = made.filename, made.sha256, []
        params = job.params.copy()
        params["backup"], params["sha256"] = filename, sha256
        result = await self.restore_as_asked(dataclasses.replace(job, params=params), dest,
                                             engine, progress, identities)
        result["warnings"] = [f"restored to {asked} through {filename}", *said,
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
        if target.engine == "mysql":  # the base is a regular backup: its drill is noted there
            if target.pitr is None or not target.pitr.enabled:
                raise RestoreFailed(f"target '{target.id}' has no point-in-time recovery",
                                    database_unchanged=True, code="pitr_not_enabled")
            mine = await self.binlog_point_backup(job, target, engine, progress, asked,
                                                  identities, "PITR drill to")
            filename, base_name, when = mine.filename, mine.base, mine.at
            archive, base_ref = target.id, naming.parse(mine.base)
        else:
            made = await self._point_backup(job, target, engine, progress, asked,
                                            identities, "PITR drill to")
            filename, base_name, when = made.filename, made.base.filename, made.at
            archive = target.id + naming.PITR_SUFFIX
            base_ref = naming.parse_archive(made.base.filename)
        recovered_s = time.monotonic() - t0
        at = when.isoformat(timespec="milliseconds").replace("+00:00", "Z") \
            if when else "latest"
        facts: dict[str, object] = {"point_in_time": at, "base": base_name,
                                    "job": job.id, "at": now_iso()}
        try:
            record = await self.verify(
                dataclasses.replace(job, params={"backup": filename}), target, engine,
                progress, identities, keep_plan=True)
        except SafeholdError as exc:
            with contextlib.suppress(Exception):
                await self.catalog.annotate(archive, base_ref,
                                            {"last_drill": {**facts, "outcome": "failed",
                                                            "error": exc.code}})
            raise
        finally:
            with contextlib.suppress(Exception):  # a by-product: the drill was of the archive
                await self.catalog.delete(target.id, naming.parse(filename))
        record["rto_s"] = round(recovered_s + float(record.get("rto_s") or 0), 3)
        record["duration_s"] = round(time.monotonic() - t0, 3)
        record["point_in_time"] = at
        record["base"] = base_name
        record["mode"] = "pitr-scratch-recovery"
        await self.catalog.annotate(archive, base_ref, {
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
        plan = choose(await self.catalog.list_backups(archive), asked, target.id)
        ids = list(identities) + self.identities(target)
        progress.set_phase(Phase.RECOVERING)
        async with scratch.work_dir("pitr") as work:
            filename, sha256 = await self._recover_and_dump(
                job, target, engine, progress, plan, work,
                ArchiveReader(self.catalog, archive, ids), note)
        return PointBackup(filename, sha256, plan.base, plan.at)

    async def _recover_and_dump(self, job: Job, target: TargetConfig, engine: Engine,
                                progress: Progress, plan: Recovery, work: Path,
                                reader: ArchiveReader, note: str) -> tuple[str, str]:
        tools = await pg_pitr.bindir(target)
        data, staged = work / "data", work / "wal"
        await asyncio.to_thread(staged.mkdir)
        await reader.unpack_base(plan.base, data)
        segments = await reader.stage(plan.wal, staged)
        newest = await pg_pitr.last_commit(tools, segments)
        # past the archive's last commit there is nothing to stop before: replay it all
        at = plan.at
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
                     f"{plan.base.filename}, WAL to "
                     f"{pg_pitr.lsn_text(plan.wal[-1].end) if plan.wal else '-'}")
        return made["filename"], made["sha256"]
