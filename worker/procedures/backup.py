"""Backup and prune: dump -> codec chain (gzip|zstd, age) -> sha256 -> every destination
of the target at once -> read-back check -> manifests last; retention per destination."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict

from shared import codecs, manifests, naming, retention
from shared.config import TargetConfig
from shared.errors import (
    NotFound,
)
from shared.jobs import Job, JobKind, Phase
from shared.naming import ENGINE_FORMATS
from shared.outage import RedisUnavailable
from shared.storage.base import Outcome
from shared.storage.catalog import Fanout
from worker import pipeline
from worker.engines import DumpOptions, Engine, RowCounting
from worker.procedures.base import ProcedureBase, counted, log
from worker.progress import Progress


class BackupResult(TypedDict):
    """A backup job's `result` (and what a restore learns of its safety backup)."""

    filename: str
    kind: str
    size_bytes: int
    raw_bytes: int
    sha256: str
    compressed: bool
    codecs: list[str]
    stored_on: list[str]
    destinations: dict[str, Outcome]
    partial: bool
    duration_s: float
    warnings: list[str] | None


class Backups(ProcedureBase):
    def chain(self, target: TargetConfig, compress: bool = True) -> list[codecs.Step]:
        """The codec chain of a new backup of `target` (with the recipients' keys, which
        `codecs.recorded` leaves out of the manifest)."""
        chain: list[codecs.Step] = []
        algorithm = target.compression if target.compression != "none" else "gzip"
        if compress and algorithm == "gzip":
            level = target.compression_level
            chain.append({"codec": "gzip", "implementation": codecs.GZIP_IMPL,
                          "level": self.settings.worker.compress_level if level is None
                          else level})
        elif compress and algorithm == "zstd":
            cores = os.cpu_count() or 1
            chain.append({"codec": "zstd", "level": target.compression_level or 3,
                          "threads": min(4, cores - 1) if cores > 1 else 0})
        if target.encryption is not None:
            keys = target.encryption.recipient_lines()
            chain.append({"codec": "age",
                          "recipients": [codecs.recipient_fingerprint(k) for k in keys],
                          "recipient_keys": keys})
        return chain

    async def backup(self, job: Job, target: TargetConfig, engine: Engine, progress: Progress,
                     *, kind: str, compress: bool, note: str = "",
                     parent: str | None = None, tables: Sequence[str] = ()
                     ) -> BackupResult:
        """Dump -> codec chain -> sha256 -> every destination -> read-back -> manifests."""
        started = datetime.now(UTC)
        t0 = time.monotonic()
        chain = self.chain(target, compress)
        # encoders first: recipients that cannot be loaded fail the backup before a byte
        # is written anywhere (never stored unencrypted)
        stages = codecs.encoders(chain)
        options = DumpOptions()
        if job.params.get("format"):
            options["format"] = job.params["format"]
        if job.params.get("use_apoc"):
            options["use_apoc"] = True
        if tables:  # a safety backup of what a tables restore will change
            options["tables"] = list(tables)
        fmt = options.get("format")
        ext = fmt if fmt in ENGINE_FORMATS.get(engine.name, ()) else engine.extension

        async def record_handles(handles: list[str]) -> None:
            await self.store.set_fields(job.id, temp_handles=" ".join(handles))

        try:
            name = await self.catalog.reserve(target, naming.new_name(
                kind, engine.name, started, codecs=[s["codec"] for s in chain], ext=ext),
                claim=self.store.name_claimer(target.id, job.id))
            fan = await self.catalog.begin(target, name, job.id, on_handles=record_handles)
        except BaseException:
            for stage in stages:
                if close := getattr(stage, "close", None):
                    await asyncio.to_thread(close)
            raise
        try:
            counter = engine.row_counter() if isinstance(engine, RowCounting) else None
            # dump bytes per estimated byte, learned from the previous backup
            ratio = await self._learned_ratio(target)
            progress.estimate_scale = ratio or 1.0
            async with engine.dump(target, progress, options) as dump:
                if "set" in dump.info:  # a server target counts each database apart
                    counter = None
                if estimate := progress.estimated_bytes:  # the engine's on-disk estimate
                    dump.info["size_estimate"] = {"bytes": estimate, "ratio_used": ratio}
                chunks = dump.chunks if counter is None else counted(dump.chunks, counter)
                out = await pipeline.store(chunks, fan, stages, on_bytes=progress.add_bytes)
            if counter is not None:
                dump.info.update(counter.result())
            progress.phase = Phase.PUBLISHING
            outcomes = await fan.finish(out["size_bytes"], out["sha256"])
        except BaseException:
            await asyncio.shield(fan.abort())
            raise
        made = manifests.DumpFacts(duration_s=time.monotonic() - t0, job=job.id,
                                   parent=parent, warnings=progress.warnings)
        manifest = manifests.Manifest(
            name=name, target=target.id, created_at=started, finished_at=datetime.now(UTC),
            size_bytes=out["size_bytes"], sha256=out["sha256"], raw_bytes=out["raw_bytes"],
            chain=chain, destinations=outcomes, requested_by=job.requested_by, note=note,
            facts=dump.info, dump=made)
        await self._publish(job, target, name, fan, manifest)
        try:  # bookkeeping only: the backup is complete and published
            await self.store.set_fields(job.id, temp_handles="")
        except RedisUnavailable:
            log.warning("job %s: its temp handles stay recorded (Redis away)", job.id)
        stored_on = fan.live()
        if len(stored_on) < len(outcomes):  # a failure, or a manifest not written
            lost = {n: o["error"]["message"] if o["status"] == "failed"
                    else "manifest not written"
                    for n, o in outcomes.items() if n not in stored_on}
            progress.warn(f"backup {name.filename} is stored on {', '.join(stored_on)} only; "
                          + "; ".join(f"{n} failed: {m}" for n, m in lost.items()))
        return {
            "filename": name.filename,
            "kind": kind,
            "size_bytes": out["size_bytes"],
            "raw_bytes": out["raw_bytes"],
            "sha256": out["sha256"],
            "compressed": any(s["codec"] in ("gzip", "zstd") for s in chain),
            "codecs": [s["codec"] for s in chain],
            "stored_on": stored_on,
            "destinations": outcomes,
            "partial": len(stored_on) < len(outcomes),
            "duration_s": round(made.duration_s, 3),
            "warnings": progress.warnings or None,
        }

    async def _publish(self, job: Job, target: TargetConfig, name: naming.BackupName,
                       fan: Fanout, manifest: manifests.Manifest) -> None:
        """Write the manifests: the backup's commit, only while the job is still this
        worker's; a cancel meanwhile lets it finish, then takes the backup back out."""
        try:
            await self.still_ours(job)
        except BaseException:
            await asyncio.shield(fan.abort())
            raise
        publishing = asyncio.ensure_future(fan.publish(manifest))
        try:
            await asyncio.shield(publishing)
        except asyncio.CancelledError:
            # cancelled while publishing: let it finish, then take it back out
            with contextlib.suppress(Exception):
                await publishing
                await self.catalog.delete(target.id, name)
            raise
        except BaseException:
            await asyncio.shield(fan.abort())
            raise

    async def _learned_ratio(self, target: TargetConfig) -> float | None:
        """Plain dump bytes per byte of the engine's estimate, from the newest backup of
        this target that recorded both (progress then follows bytes against a size that
        means something, instead of sitting at 99 %)."""
        with contextlib.suppress(Exception):
            for m in await self.catalog.list_backups(target.id):
                estimate, raw = m.get("size_estimate"), m.get("raw_bytes")
                est = estimate.get("bytes") if isinstance(estimate, dict) else None
                if isinstance(est, int | float) and isinstance(raw, int | float) and est and raw:
                    return min(50.0, max(0.02, float(raw) / float(est)))
        return None

    # ----------------------------------------------------------------- prune

    async def prune(self, job: Job, target: TargetConfig, progress: Progress,
                    on_delete: Callable[[str, str, list[str]], Awaitable[None]]
                    ) -> dict[str, Any]:
        """Apply the target's retention on each of its destinations (regular backups by the
        policy; safety backups and uploads: younger than 7 days, or the newest, are kept).
        Runs under the target lock, so no restore of this target reads meanwhile; a backup
        a queued restore names is kept too. `dry_run` returns the plan only."""
        dry_run = bool(job.params.get("dry_run"))
        progress.set_phase(Phase.PLANNING)
        async def named_by_jobs() -> set[str]:
            return {str(j.params.get("backup"))
                    for j in await self.store.active_for_target(target.id)
                    if j.kind in (JobKind.RESTORE, JobKind.VERIFY) and j.id != job.id}

        busy = await named_by_jobs()
        now = datetime.now(UTC)
        out: dict[str, Any] = {"dry_run": dry_run, "policy": target.retention.public(),
                               "destinations": {}}
        for store in self.catalog.stores_of(target):
            manifests = await store.list_manifests(target.id)
            mine = store.config.retention or target.retention  # a destination may keep more
            decisions = retention.plan_destination(manifests, mine, now, target.timezone)
            for d in decisions:
                if not d.keep and d.filename in busy:
                    d.keep, d.reasons = True, ["a queued restore names it"]
            deleted = []
            if not dry_run:
                progress.set_phase(Phase.DELETING)
                for d in decisions:
                    if d.keep:
                        continue
                    if d.filename in await named_by_jobs():  # submitted while we planned
                        d.keep, d.reasons = True, ["a queued restore names it"]
                        continue
                    try:
                        await store.delete(target.id, d.filename)
                    except NotFound:
                        continue
                    deleted.append(d.filename)
                    await on_delete(store.name, d.filename, d.reasons)
            out["destinations"][store.name] = {
                "policy": mine.public(),
                "plan": [d.public() for d in decisions],
                "kept": sum(d.keep for d in decisions),
                "deleted": deleted if not dry_run else
                [d.filename for d in decisions if not d.keep]}
        return out

    # ----------------------------------------------------------------- drill
