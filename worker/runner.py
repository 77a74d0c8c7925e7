"""Runs one job: status transitions, heartbeat, progress publishing, cancellation. The
backup and restore procedures themselves are in `worker.procedures`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import logs, rcmd
from shared.audit import AuditLog
from shared.codecs.base import AgeKey
from shared.config import Settings, TargetConfig
from shared.errors import (
    EngineError,
    SafeholdError,
    disk_full,
)
from shared.jobs import (
    Job,
    JobError,
    JobKind,
    JobResult,
    JobStatus,
    JobStore,
    Phase,
    RestoreStage,
    now_iso,
    restore_cancellable,
)
from shared.keys import Keys
from shared.locks import TargetLock
from shared.notify import Notifier
from shared.outage import UNREACHABLE, RedisUnavailable, ride_out
from shared.outcomes import Outcomes
from shared.redact import redact
from shared.storage.catalog import Catalog
from worker.engines import ENGINE_CLASSES, Engine, get_engines
from worker.procedures import Procedures
from worker.progress import Progress

log = logging.getLogger("safehold.worker")
REDIS_OUTAGE_MAX = 600.0  # seconds a finished job waits for Redis to record its outcome


class JobRunner:
    def __init__(self, settings: Settings, redis: Redis, worker_id: str) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.redis.prefix)
        self.grace = settings.worker.redis_grace
        # a job's own Redis writes ride out an outage of up to `redis_grace` (outage.py)
        self.store = JobStore(redis, self.keys, ttl=settings.worker.job_ttl, grace=self.grace)
        self.catalog = Catalog(settings)
        self.engines: dict[str, Engine] = get_engines(
            {t.engine for t in settings.targets.values()})
        self.worker_id = worker_id
        self.audit = AuditLog(redis, self.keys)
        self.procedures = Procedures(settings, self.store, self.catalog)
        # set by the worker: what follows a successful backup (a scheduled one is pruned)
        self.after_backup: Callable[[Job], Awaitable[object]] | None = None
        self.outcomes = Outcomes(settings, redis, self.store, self.audit)
        self.notifier: Notifier = self.outcomes.notifier
        # the reaper's passes never wait out an outage (the next pass comes soon)
        self.reaper_outcomes = Outcomes(
            settings, redis, JobStore(redis, self.keys, ttl=settings.worker.job_ttl),
            self.audit, self.notifier)
        self._secrets = [t.password.reveal() for t in settings.targets.values() if t.password]
        import pyrage

        # identities sent with restores are sealed to this key; it never leaves memory
        self.transport_key = pyrage.x25519.Identity.generate()
        self.transport_recipient = str(self.transport_key.to_public())

    # ----------------------------------------------------------------- job lifecycle
    async def run(self, job_id: str) -> dict[str, str]:
        logs.job_id.set(job_id)  # every log line of this job's task (and its children)
        job = await self.store.find(job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return {"skipped": job.status if job else "unknown job"}
        if not await self.store.transition(
            job_id, [JobStatus.QUEUED], JobStatus.RUNNING,
            fields={"started_at": now_iso(), "worker": self.worker_id},
            data={"worker": self.worker_id},
        ):
            return {"skipped": "no longer queued"}
        job = await self.store.get(job_id)
        await ride_out("starting its heartbeat", lambda: self._heartbeat(job_id), self.grace)
        target_cfg = self.settings.targets.get(job.target)
        if target_cfg and target_cfg.heartbeat_url and job.kind == JobKind.BACKUP and \
                job.params.get("scheduled_slot"):
            self.outcomes.deliver(self.notifier.heartbeat(target_cfg.heartbeat_url, "start"))
        progress = Progress()
        if job.kind == JobKind.RESTORE:
            await self.store.set_fields(job_id, restore_state=RestoreStage.UNTOUCHED)

            async def on_stage(stage: RestoreStage) -> None:
                if stage == RestoreStage.COMMITTING:  # the point of no return: still ours?
                    await self.procedures.still_ours(job)
                await self.store.set_fields(job_id, restore_state=stage)

            progress.on_stage = on_stage
        w = self.settings.worker
        # the lock outlives an outage the job rides out (the reaper releases a dead job's)
        lock = TargetLock(self.redis, self.keys.lock(job.target), job_id,
                          ttl_s=max(30.0, w.redis_grace + w.orphan_after))
        work = asyncio.create_task(self._execute(job, progress, lock))
        state = _Watch(beat_ok=time.monotonic())
        monitor = asyncio.create_task(self._monitor(job, progress, lock, work, state))
        try:
            result = await work
        except asyncio.CancelledError:
            if not work.done():
                work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            status, error = _stopped(job, state)
            await asyncio.shield(self._finish(job, progress, status, error=error))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return {"status": JobStatus.CANCELLED.value}
        except SafeholdError as exc:
            error = cast(JobError, {**exc.details, **exc.to_dict()})
            error["message"] = redact(error["message"], self._secrets)
            await asyncio.shield(self._finish(job, progress, JobStatus.FAILED, error=error))
            return {"status": JobStatus.FAILED.value}
        except Exception as exc:
            error = self._crashed(job_id, exc)
            await asyncio.shield(self._finish(job, progress, JobStatus.FAILED, error=error))
            return {"status": JobStatus.FAILED.value}
        finally:
            # the monitor ends by itself once the work is done (publishing the last phases)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(monitor), 5)
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            await asyncio.shield(self._cleanup(job_id, lock))
        await asyncio.shield(self._finish(job, progress, JobStatus.SUCCEEDED, result=result))
        return {"status": JobStatus.SUCCEEDED.value}

    def _crashed(self, job_id: str, exc: Exception) -> JobError:
        """The error of a job that ended on an exception Safehold did not raise itself."""
        if disk_full(exc):
            log.error("job %s: no space left on the storage (%s)", job_id, exc)
            return {"code": "storage_full",
                    "message": redact(f"no space left on the storage ({exc}); the partial "
                                      "file was removed and nothing is listed; free space "
                                      "(or prune) and try again", self._secrets)}
        if isinstance(exc, RedisError):
            log.warning("job %s: Redis failed (%s: %s)", job_id, type(exc).__name__, exc)
            return {"code": "redis_unavailable",
                    "message": redact(f"Redis failed while the job ran "
                                      f"({type(exc).__name__}: {exc}); nothing was kept",
                                      self._secrets)}
        log.exception("job %s crashed", job_id)
        return {"code": "internal_error",
                "message": redact(f"{type(exc).__name__}: {exc}", self._secrets)}


    async def _finish(self, job: Job, progress: Progress, status: JobStatus, *,
                      result: JobResult | None = None,
                      error: JobError | None = None) -> None:
        if error is not None and job.kind == JobKind.RESTORE and "database_state" not in error:
            # a restore that never reached loading has changed nothing
            error["database_state"] = "unchanged" if not progress.stages else "unknown"
        snap = progress.snapshot()
        if status == JobStatus.SUCCEEDED:
            snap["percent"] = 100.0
            snap["eta_s"] = 0.0
        also: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if status == JobStatus.SUCCEEDED and job.kind == JobKind.BACKUP:
            also.append(("schedule state", lambda: self._backup_succeeded(job)))
            if self.after_backup is not None:
                after = self.after_backup
                also.append(("prune after the backup", lambda: after(job)))
        # the work is done: losing its record would make a stored backup look failed, so
        # the outcome waits for Redis longer than the work would (REDIS_OUTAGE_MAX), and
        # the job keeps beating meanwhile (else a reaper would take it for dead)
        beating = asyncio.create_task(self._keep_beating(job.id))
        try:
            await self.outcomes.end(job, [JobStatus.RUNNING], status, result=result, error=error,
                                    fields={"progress": snap}, retry_for=REDIS_OUTAGE_MAX,
                                    also=also)
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(self.keys.heartbeat(job.id))

    async def _keep_beating(self, job_id: str) -> None:
        while True:
            try:
                await self._heartbeat(job_id)
                await asyncio.sleep(self.settings.worker.heartbeat_interval)
            except (RedisError, OSError):
                await asyncio.sleep(0.5)

    async def _backup_succeeded(self, job: Job) -> None:
        """Remember the success (missed-run detection) and clear a missed-run alert."""
        key = self.keys.schedule(job.target)
        await rcmd.hset(self.redis, key, "last_success", now_iso())
        if await rcmd.hdel(self.redis, key, "missed_alerted"):
            await self.audit.record(action="schedule.recovered", result="ok",
                                    target=job.target, job=job.id)
            self.outcomes.deliver(self.notifier.event(
                "schedule.recovered", job.target,
                f"target {job.target} has a successful backup again ({job.id})"))

    async def close(self) -> None:
        """Let notifications in flight finish (briefly) before the worker exits."""
        await self.outcomes.close()

    async def _cleanup(self, job_id: str, lock: TargetLock) -> None:
        async def release() -> None:
            await lock.release()
            await self.redis.delete(self.keys.heartbeat(job_id))
        try:
            await ride_out("releasing its lock", release, self.grace)
        except RedisUnavailable:  # both lapse by themselves (TTLs)
            log.warning("job %s: lock and heartbeat left to expire (Redis away)", job_id)

    async def _heartbeat(self, job_id: str) -> None:
        ttl = int(self.settings.worker.orphan_after * 1000)
        await self.redis.set(self.keys.heartbeat(job_id), self.worker_id, px=ttl)

    async def _monitor(self, job: Job, progress: Progress, lock: TargetLock,
                       work: asyncio.Task[JobResult], state: _Watch) -> None:
        """Keep watching the job through transient Redis errors (a dead monitor would stop
        the heartbeat and get a healthy job reaped)."""
        while not work.done():
            try:
                await self._watch(job, progress, lock, work, state)
            except UNREACHABLE + (RedisError,) as exc:
                log.warning("job %s: Redis error while reporting progress (%s); retrying",
                            job.id, exc)
                await asyncio.wait({work}, timeout=1.0)
        # what the work said as it ended (a warning added while the watch awaited Redis,
        # then the work done: the watch's loop ends before its next flush)
        with contextlib.suppress(*UNREACHABLE, RedisError):
            await self._publish_phases(job, progress)

    async def _publish_phases(self, job: Job, progress: Progress) -> None:
        """Phases and log lines, in the order they happened."""
        while progress.outbox:
            kind, data = progress.outbox[0]
            await self.store.publish(job.id, kind, data)
            progress.outbox.pop(0)  # only once published: a Redis error retries it

    async def _watch(self, job: Job, progress: Progress, lock: TargetLock,
                     work: asyncio.Task[JobResult], state: _Watch) -> None:
        """Publish progress, heartbeat, refresh the lock, and honour cancel requests."""
        w = self.settings.worker
        last_publish = last_cancel_check = time.monotonic()
        last_beat = 0.0  # beat at once: after an outage, before any reaper's second look
        last: dict[str, object] = {}
        volatile = ("elapsed_s", "rate_bps", "eta_s")
        while not work.done():
            await asyncio.wait({work}, timeout=0.1)
            await self._publish_phases(job, progress)
            if work.done():
                break
            now = time.monotonic()
            if now - last_beat >= w.heartbeat_interval:
                await self._heartbeat(job.id)
                away = time.monotonic() - state.beat_ok
                state.beat_ok = last_beat = time.monotonic()
                if await self._fenced(job, progress, lock, work, state, away):
                    continue
            if now - last_publish >= w.progress_interval:
                snap = progress.snapshot()
                if any(snap[k] != last.get(k) for k in snap if k not in volatile):
                    await self.store.publish(job.id, "progress", {"progress": snap},
                                             progress=snap)
                last, last_publish = snap, now
            if now - last_cancel_check < w.progress_interval:
                continue
            last_cancel_check = now
            flag = await rcmd.hget(self.redis,
                self.keys.job(job.id), "cancel_requested")
            if flag == b"1" and not state.cancel_requested:
                stage = progress.stages[-1] if progress.stages else None
                if job.kind == JobKind.RESTORE and not restore_cancellable(stage):
                    await rcmd.hdel(self.redis, self.keys.job(job.id),
                                          "cancel_requested")
                    await self.store.publish(job.id, "log", {
                        "message": "too late to cancel: the restore is changing the database; "
                                   "it completes or rolls back by itself"})
                    continue
                state.cancel_requested = True
                work.cancel()

    async def _fenced(self, job: Job, progress: Progress, lock: TargetLock,
                      work: asyncio.Task[JobResult], state: _Watch, away: float) -> bool:
        """After Redis comes back: if others took this job for dead (a worker cut off alone
        for longer than `orphan_after` is reaped) or took its target's lock, its work stops
        at once where stopping is safe. True when it was stopped."""
        why = None
        if away > self.settings.worker.orphan_after:
            current = await self.store.find(job.id)
            if current is None or current.status != JobStatus.RUNNING or \
                    current.worker != self.worker_id:
                why = (f"this worker could not reach Redis for {away:.0f}s and the job was "
                       "taken for lost meanwhile; its work stopped when Redis answered again")
        if why is None and not await lock.refresh():
            why = (f"the lock on target {job.target} lapsed while Redis was away and another "
                   "job holds it now; this job stopped, nothing was kept")
        if why is None:
            return False
        stage = progress.stages[-1] if progress.stages else None
        if job.kind == JobKind.RESTORE and not restore_cancellable(stage):
            progress.warn(why.split(";")[0] + "; the restore is changing the database and "
                          "goes on to its end (or its rollback)")
            return False
        log.warning("job %s: %s", job.id, why)
        state.lost = why
        work.cancel()
        return True

    async def _execute(self, job: Job, progress: Progress, lock: TargetLock) -> JobResult:
        target = self.settings.target(job.target)
        engine = self.engines.get(target.engine)
        if engine is None:
            raise EngineError(f"engine {target.engine} is not available in this worker",
                              code="engine_unavailable")
        if job.kind == JobKind.STATS:  # read-only: no lock
            progress.set_phase(Phase.QUERYING)
            return await engine.stats(target)
        if job.kind == JobKind.PREVIEW:  # reads a backup, never the database: no lock
            return await self.procedures.preview(job, target, progress, await (
                self._supplied_identity(job)) if job.params.get("identity_supplied") else [])
        if not await ride_out("taking the target lock", lock.try_acquire, self.grace):
            progress.set_phase(Phase.WAITING_FOR_LOCK)  # (and its line) only when there is a wait
            holder = await ride_out("reading the lock", lock.holder, self.grace)
            if holder and holder != job.id:
                progress.log(f"waiting for job {holder} on target {target.id} to finish")
            await ride_out("waiting for the target lock", lock.acquire, self.grace)
        supplied = await self._supplied_identity(job) \
            if job.params.get("identity_supplied") else []
        if job.kind == JobKind.VERIFY and job.params.get("point_in_time"):
            return dict(await self.procedures.drill_to_time(job, target, engine, progress,
                                                            supplied))
        if job.kind == JobKind.VERIFY:
            return dict(await self.procedures.verify(job, target, engine, progress, supplied))
        if job.kind == JobKind.PRUNE:
            async def on_delete(destination: str, filename: str, reasons: list[str]) -> None:
                await self.audit.record(
                    action="prune.deleted", result="ok", subject=job.requested_by.get("subject"),
                    client=job.requested_by.get("client"), via=job.requested_by.get("via"),
                    target=job.target, job=job.id,
                    backup=filename, detail=f"{destination}: {'; '.join(reasons)}")
            return await self.procedures.prune(job, target, progress, on_delete)
        if job.kind == JobKind.BACKUP:
            return dict(await self.procedures.backup(
                job, target, engine, progress, kind="backup",
                compress=bool(job.params.get("compress", target.compress)),
                note=str(job.params.get("note") or "")))
        if job.params.get("point_in_time"):
            return dict(await self.procedures.restore_to_time(job, target, engine, progress,
                                                              supplied))
        return dict(await self.procedures.restore_as_asked(job, target, engine, progress,
                                                           supplied))

    async def _supplied_identity(self, job: Job) -> list[AgeKey]:
        """Open the identity sent with this restore or drill (sealed by the API to the live
        workers' keys) and forget the sealed copy; it stays in this process's memory only."""
        import pyrage

        from shared.codecs import load_identities

        sealed = None
        for _ in range(50):  # written just before the job was enqueued
            sealed = await ride_out("reading the sealed identity", lambda: self.redis.getdel(
                self.keys.sealed_identity(job.id)), self.grace)
            if sealed is not None:
                break
            await asyncio.sleep(0.1)
        if sealed is None:
            raise EngineError(f"the identity sent with this {job.kind} is gone (expired or "
                              f"already used); send the {job.kind} again",
                              code="identity_required")
        try:
            text = (await asyncio.to_thread(pyrage.decrypt, sealed, [self.transport_key]))
        except Exception:
            raise EngineError(f"the identity sent with this {job.kind} was sealed for workers "
                              f"that are no longer running; send the {job.kind} again",
                              code="identity_required") from None
        return load_identities(bytes(text).decode())


def ensure_engines(settings: Settings) -> None:
    missing = sorted({t.engine for t in settings.targets.values()} - set(ENGINE_CLASSES))
    if missing:
        from shared.errors import ConfigError

        raise ConfigError(f"engine(s) {', '.join(missing)} are not available in this worker "
                          f"yet (available: {', '.join(sorted(ENGINE_CLASSES))})")




async def check_targets(settings: Settings, timeout: float = 15.0
                        ) -> list[tuple[str, str | None]]:
    """Each target reached with its own credentials (`safehold config check --connect`):
    (target id, None) when it answered, else (target id, why not)."""
    ensure_engines(settings)
    engines = get_engines({t.engine for t in settings.targets.values()})

    async def one(target: TargetConfig) -> tuple[str, str | None]:
        try:
            await asyncio.wait_for(engines[target.engine].ping(target), timeout)
        except TimeoutError:
            return target.id, f"no answer within {timeout:.0f} s"
        except Exception as exc:  # any failure is the answer here
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            return target.id, redact(str(message), target.secrets())
        return target.id, None
    return list(await asyncio.gather(*(one(t) for t in settings.targets.values())))


@dataclass
class _Watch:
    """What the monitor learns while a job runs: how its task, if cancelled, must end."""

    beat_ok: float  # when a heartbeat last reached Redis (monotonic)
    cancel_requested: bool = False
    lost: str | None = None  # why others took the job (or its lock) while Redis was away


def _stopped(job: Job, state: _Watch) -> tuple[JobStatus, JobError]:
    """How a job whose task was cancelled ends: lost to others (reaped, or its lock taken),
    cancelled on request, or interrupted (shutdown, job timeout)."""
    if state.lost:
        return JobStatus.FAILED, {"code": "redis_unavailable", "message": state.lost}
    if state.cancel_requested:
        if job.kind == JobKind.RESTORE:
            return JobStatus.CANCELLED, {"code": "cancelled", "database_state": "unchanged",
                                 "message": "cancelled on request before the restore "
                                            "changed anything: the database is unchanged"}
        return JobStatus.CANCELLED, {"code": "cancelled",
                             "message": "cancelled on request; nothing was kept"}
    return JobStatus.FAILED, {"code": "interrupted",
                      "message": "the worker stopped (shutdown or job timeout) before the "
                                 "job finished; nothing was kept"}
