"""Runs one job: status transitions, heartbeat, progress publishing, cancellation, and the
backup / restore procedures on top of an engine, the pipeline and storage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import naming
from shared.audit import AuditLog
from shared.config import Settings, TargetConfig
from shared.errors import (
    BadRequest,
    EngineError,
    IntegrityError,
    PipelineError,
    RestoreFailed,
    SafeholdError,
)
from shared.jobs import Job, JobStore, now_iso
from shared.keys import Keys
from shared.redact import redact
from shared.storage import LocalStorage
from worker import pipeline
from worker.engines import ENGINE_CLASSES, Engine, get_engines
from worker.locks import TargetLock
from worker.progress import Progress

log = logging.getLogger("safehold.worker")


class JobRunner:
    def __init__(self, settings: Settings, redis: Redis, worker_id: str) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.redis.prefix)
        self.store = JobStore(redis, self.keys, ttl=settings.worker.job_ttl)
        self.storage = LocalStorage(settings.storage.path)
        self.engines: dict[str, Engine] = get_engines(
            {t.engine for t in settings.targets.values()})
        self.worker_id = worker_id
        self.audit = AuditLog(redis, self.keys)
        self._secrets = [t.password.reveal() for t in settings.targets.values() if t.password]

    # ----------------------------------------------------------------- job lifecycle
    async def run(self, job_id: str) -> dict[str, Any]:
        job = await self.store.find(job_id)
        if job is None or job.status != "queued":
            return {"skipped": job.status if job else "unknown job"}
        if not await self.store.transition(
            job_id, ["queued"], "running",
            fields={"started_at": now_iso(), "worker": self.worker_id},
            data={"worker": self.worker_id},
        ):
            return {"skipped": "no longer queued"}
        job = await self.store.get(job_id)
        await self._heartbeat(job_id)
        progress = Progress()
        lock = TargetLock(self.redis, self.keys.lock(job.target), job_id)
        work = asyncio.create_task(self._execute(job, progress, lock))
        state = {"cancel_requested": False}
        monitor = asyncio.create_task(self._monitor(job, progress, lock, work, state))
        try:
            result = await work
        except asyncio.CancelledError:
            if not work.done():
                work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            if state["cancel_requested"]:
                await asyncio.shield(self._finish(
                    job, progress, "cancelled",
                    error={"code": "cancelled",
                           "message": "cancelled on request; nothing was kept"}))
            else:
                await asyncio.shield(self._finish(
                    job, progress, "failed",
                    error={"code": "interrupted",
                           "message": "the worker stopped (shutdown or job timeout) before "
                                      "the job finished; nothing was kept"}))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return {"status": "cancelled"}
        except SafeholdError as exc:
            error = {**exc.to_dict(), **exc.details}
            error["message"] = redact(str(error["message"]), self._secrets)
            await asyncio.shield(self._finish(job, progress, "failed", error=error))
            return {"status": "failed"}
        except Exception as exc:
            log.exception("job %s crashed", job_id)
            error = {"code": "internal_error",
                     "message": redact(f"{type(exc).__name__}: {exc}", self._secrets)}
            await asyncio.shield(self._finish(job, progress, "failed", error=error))
            return {"status": "failed"}
        finally:
            # the monitor ends by itself once the work is done (publishing the last phases)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(monitor), 5)
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            await asyncio.shield(self._cleanup(job_id, lock))
        await asyncio.shield(self._finish(job, progress, "succeeded", result=result))
        return {"status": "succeeded"}

    async def _finish(self, job: Job, progress: Progress, status: str, *,
                      result: dict[str, Any] | None = None,
                      error: dict[str, Any] | None = None) -> None:
        snap = progress.snapshot()
        if status == "succeeded":
            snap["percent"] = 100.0
            snap["eta_s"] = 0.0
        fields: dict[str, Any] = {"finished_at": now_iso(), "progress": snap}
        data: dict[str, Any] = {}
        if result is not None:
            fields["result"] = data["result"] = result
        if error is not None:
            fields["error"] = data["error"] = error
        if await self.store.transition(job.id, ["running"], status, fields=fields, data=data):
            await self.audit.record(
                action=f"job.{job.kind}", result=status,
                subject=job.requested_by.get("subject"), client=job.requested_by.get("client"),
                target=job.target, job=job.id,
                backup=(result or {}).get("filename") or job.params.get("backup"),
                detail=(error or {}).get("code"))

    async def _cleanup(self, job_id: str, lock: TargetLock) -> None:
        await lock.release()
        await self.redis.delete(self.keys.heartbeat(job_id))

    async def _heartbeat(self, job_id: str) -> None:
        ttl = int(self.settings.worker.orphan_after * 1000)
        await self.redis.set(self.keys.heartbeat(job_id), self.worker_id, px=ttl)

    async def _monitor(self, job: Job, progress: Progress, lock: TargetLock,
                       work: asyncio.Task[Any], state: dict[str, bool]) -> None:
        """Keep watching the job through transient Redis errors (a dead monitor would stop
        the heartbeat and get a healthy job reaped)."""
        while not work.done():
            try:
                await self._watch(job, progress, lock, work, state)
            except RedisError as exc:
                log.warning("job %s: Redis error while reporting progress (%s); retrying",
                            job.id, exc)
                await asyncio.wait({work}, timeout=1.0)

    async def _publish_phases(self, job: Job, progress: Progress) -> None:
        while progress.new_phases:
            await self.store.publish(job.id, "phase", {"phase": progress.new_phases.pop(0)})

    async def _watch(self, job: Job, progress: Progress, lock: TargetLock,
                     work: asyncio.Task[Any], state: dict[str, bool]) -> None:
        """Publish progress, heartbeat, refresh the lock, and honour cancel requests."""
        w = self.settings.worker
        last_beat = last_publish = last_cancel_check = time.monotonic()
        last: dict[str, Any] = {}
        volatile = ("elapsed_s", "rate_bps", "eta_s")
        while not work.done():
            await asyncio.wait({work}, timeout=0.1)
            await self._publish_phases(job, progress)
            if work.done():
                break
            now = time.monotonic()
            if now - last_publish >= w.progress_interval:
                snap = progress.snapshot()
                if any(snap[k] != last.get(k) for k in snap if k not in volatile):
                    await self.store.publish(job.id, "progress", {"progress": snap},
                                             progress=snap)
                last, last_publish = snap, now
            if now - last_cancel_check < w.progress_interval:
                continue
            last_cancel_check = now
            if now - last_beat >= w.heartbeat_interval:
                last_beat = time.monotonic()
                await self._heartbeat(job.id)
                await lock.refresh()
            flag = await self.redis.hget(  # type: ignore[misc]
                self.keys.job(job.id), "cancel_requested")
            if flag == b"1" and not state["cancel_requested"]:
                state["cancel_requested"] = True
                work.cancel()

    async def _execute(self, job: Job, progress: Progress, lock: TargetLock) -> dict[str, Any]:
        target = self.settings.target(job.target)
        engine = self.engines.get(target.engine)
        if engine is None:
            raise EngineError(f"engine {target.engine} is not available in this worker",
                              code="engine_unavailable")
        if job.kind == "stats":  # read-only: no lock
            progress.set_phase("querying")
            return await engine.stats(target)
        progress.set_phase("waiting_for_lock")
        holder = await lock.holder()
        if holder and holder != job.id:
            await self.store.publish(job.id, "log", {
                "message": f"waiting for job {holder} on target {target.id} to finish"})
        await lock.acquire()
        if job.kind == "backup":
            return await self.backup(job, target, engine, progress, kind="backup",
                                     compress=bool(job.params.get("compress", target.compress)),
                                     note=str(job.params.get("note") or ""))
        return await self.restore(job, target, engine, progress)

    # ----------------------------------------------------------------- backup
    async def backup(self, job: Job, target: TargetConfig, engine: Engine, progress: Progress,
                     *, kind: str, compress: bool, note: str = "",
                     parent: str | None = None) -> dict[str, Any]:
        """Dump -> [gzip] -> sha256 -> temp file -> atomic publish with manifest."""
        started = datetime.now(UTC)
        t0 = time.monotonic()
        level = self.settings.worker.compress_level
        temp = await asyncio.to_thread(self.storage.create_temp, target.id, job.id)
        await self.store.set_fields(job.id, temp_path=str(temp.path))

        try:
            options = {k: job.params[k] for k in ("format", "use_apoc") if job.params.get(k)}
            async with engine.dump(target, progress, options) as dump:
                out = await pipeline.store(dump.chunks, temp, compress=compress, level=level,
                                           on_bytes=progress.add_bytes)
            await asyncio.to_thread(temp.finish)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(temp.discard))
            raise
        progress.phase = "publishing"
        name = naming.new_name(kind, engine.name, started, compressed=compress,
                               ext=dump.info.pop("extension", engine.extension))
        manifest = {
            "engine": engine.name,
            "kind": kind,
            "created_at": started.isoformat().replace("+00:00", "Z"),
            "finished_at": now_iso(),
            "duration_s": round(time.monotonic() - t0, 3),
            "size_bytes": out["size_bytes"],
            "raw_bytes": out["raw_bytes"],
            "sha256": out["sha256"],
            "compression": ({"algorithm": "gzip", "implementation": pipeline.GZIP_IMPL,
                             "level": level} if compress else None),
            "encryption": None,
            **dump.info,
            "requested_by": job.requested_by,
            "job": job.id,
            "parent": parent,
            "note": note or None,
        }
        publishing = asyncio.ensure_future(
            asyncio.to_thread(self.storage.publish, target.id, temp.path, name, manifest))
        try:
            final = await asyncio.shield(publishing)
        except asyncio.CancelledError:
            # cancelled while publishing: let it finish, then take it back out
            final = await publishing
            await asyncio.to_thread(self.storage.delete, target.id, final)
            raise
        await self.store.set_fields(job.id, temp_path="")
        return {
            "filename": final.filename,
            "kind": kind,
            "size_bytes": out["size_bytes"],
            "raw_bytes": out["raw_bytes"],
            "sha256": out["sha256"],
            "compressed": compress,
            "duration_s": manifest["duration_s"],
        }

    # ----------------------------------------------------------------- restore
    async def _verify(self, target: TargetConfig, name: naming.BackupName,
                      manifest: dict[str, Any], progress: Progress) -> None:
        progress.set_phase("verifying", bytes_total=manifest.get("size_bytes"))

        path = self.storage.path_of(target.id, name)
        digest = await asyncio.to_thread(pipeline.sha256_file, path, progress.add_bytes)
        if digest != manifest.get("sha256"):
            raise IntegrityError(
                f"backup {name.filename} does not match its manifest (sha256 {digest[:16]}… "
                f"!= {str(manifest.get('sha256'))[:16]}…); refusing to restore, nothing was "
                "touched")

    async def _load(self, target: TargetConfig, engine: Engine, name: naming.BackupName,
                    manifest: dict[str, Any], progress: Progress) -> None:
        progress.set_phase("restoring", bytes_total=manifest.get("raw_bytes"))
        chunks = pipeline.read_stored(self.storage.path_of(target.id, name),
                                      decompress=name.compressed)
        try:
            await engine.restore(target, chunks, progress, clean=True, manifest=manifest)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def restore(self, job: Job, target: TargetConfig, engine: Engine,
                      progress: Progress) -> dict[str, Any]:
        """Verify -> safety backup -> clean restore -> (on failure) automatic rollback."""
        name = naming.parse(str(job.params.get("backup", "")))
        manifest = await asyncio.to_thread(self.storage.manifest, target.id, name)
        if manifest.get("engine") != target.engine:
            raise BadRequest(f"backup {name.filename} is a {manifest.get('engine')} backup; "
                             f"target '{target.id}' is {target.engine}",
                             code="engine_mismatch")
        await self._verify(target, name, manifest, progress)
        safety: str | None = None
        if job.params.get("create_safety_backup", True):
            progress.set_phase("safety_backup")
            made = await self.backup(job, target, engine, progress, kind="safety_backup",
                                     compress=True, note=f"before restoring {name.filename}",
                                     parent=job.id)
            safety = made["filename"]
            await self.store.set_fields(job.id, safety_backup=safety)
            await self.store.publish(job.id, "log",
                                     {"message": f"safety backup {safety} created"})
        t0 = time.monotonic()
        try:
            await self._load(target, engine, name, manifest, progress)
        except (RestoreFailed, PipelineError, EngineError) as exc:
            raise await self._after_failed_restore(
                job, target, engine, exc, safety, progress) from exc
        return {"restored": name.filename, "safety_backup": safety,
                "raw_bytes": manifest.get("raw_bytes"),
                "duration_s": round(time.monotonic() - t0, 3)}

    async def _after_failed_restore(self, job: Job, target: TargetConfig, engine: Engine,
                                    exc: SafeholdError, safety: str | None,
                                    progress: Progress) -> RestoreFailed:
        """Say exactly what state the database is in; roll back from the safety backup
        when the engine cannot promise the database was left unchanged."""
        msg = exc.message
        details: dict[str, Any] = {"safety_backup": safety, "rollback": None}
        if isinstance(exc, RestoreFailed) and exc.database_unchanged:
            details["database_state"] = "unchanged"
            text = f"{msg}. The database was left unchanged."
            if safety:
                text += f" (Safety backup {safety} was taken and kept.)"
        elif safety is None:
            details["database_state"] = "unknown"
            text = (f"{msg}. No safety backup was made (create_safety_backup=false): the "
                    "database may be partially restored.")
        else:
            progress.set_phase("rolling_back")
            await self.store.publish(job.id, "log", {
                "message": f"restore failed; rolling back from safety backup {safety}"})
            sname = naming.parse(safety)
            try:
                smanifest = await asyncio.to_thread(self.storage.manifest, target.id, sname)
                await self._verify(target, sname, smanifest, progress)
                await self._load(target, engine, sname, smanifest, progress)
            except SafeholdError as exc2:
                details["database_state"] = "unknown"
                details["rollback"] = {"status": "failed", "backup": safety,
                                       "error": exc2.to_dict()}
                text = (f"{msg}. The automatic rollback from safety backup {safety} ALSO "
                        f"failed ({exc2.message}); restore {safety} by hand.")
            else:
                details["database_state"] = "rolled_back"
                details["rollback"] = {"status": "succeeded", "backup": safety}
                text = (f"{msg}. Rolled back automatically: safety backup {safety} was "
                        "restored, so the database is as it was before this restore.")
        err = RestoreFailed(text)
        err.details = details
        return err


def ensure_engines(settings: Settings) -> None:
    missing = sorted({t.engine for t in settings.targets.values()} - set(ENGINE_CLASSES))
    if missing:
        from shared.errors import ConfigError

        raise ConfigError(f"engine(s) {', '.join(missing)} are not available in this worker "
                          f"yet (available: {', '.join(sorted(ENGINE_CLASSES))})")


