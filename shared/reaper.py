"""Orphan reaper: a `running` job whose worker stopped heartbeating is failed `worker_lost`;
a `queued` job a dead worker took from the queue is queued again (`Reaper`).

Workers refresh `<prefix>:job:<id>:heartbeat` every few seconds with a short TTL. Any
process (API or worker) may reap: it marks the job failed (through the same atomic
transition, so a late worker cannot resurrect it) and removes what the job was writing
(temp files, unfinished multipart uploads) through the handles its record holds. A
restore is never re-run automatically.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import cast

from shared import rcmd
from shared.config import WorkerSettings
from shared.jobs import RESTORE_STATES, Job, JobError, JobKind, JobStatus, undo_hint
from shared.locks import release_if_held_by
from shared.outcomes import Outcomes
from shared.queue import requeue_dead_claims
from shared.storage.catalog import Catalog

log = logging.getLogger("safehold.reaper")


def _age(iso: str | None) -> float:
    if not iso:
        return float("inf")
    return time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Reaper:
    """What a long-lived process (the API, each worker) runs every few seconds: dead
    workers' running jobs failed `worker_lost`, and jobs a dead worker took from the queue
    without starting them queued again.

    A heartbeat missing once is a suspicion, not a death: a Redis restart or failover drops
    heartbeats whose TTL ran out while it was away, and the live workers beat again within
    a second or two of its return. A job is reaped only when its heartbeat is still missing
    `confirm_after` seconds after it was first seen missing (`next_pass_in` brings that
    second look forward)."""

    def __init__(self, outcomes: Outcomes, catalog: Catalog, w: WorkerSettings) -> None:
        self.outcomes, self.catalog, self.w = outcomes, catalog, w
        self.confirm_after = min(2 * w.heartbeat_interval, w.orphan_after / 2)
        self.suspects: dict[str, float] = {}

    async def sweep(self) -> list[str]:
        """One pass; the ids of the jobs it failed."""
        store = self.outcomes.store
        reaped = await reap_orphans(self.outcomes, self.catalog, self.w.orphan_after,
                                    suspects=self.suspects, confirm_after=self.confirm_after)

        async def unstarted(job_id: str) -> bool:
            if await store.redis.exists(store.keys.heartbeat(job_id)):
                return False
            job = await store.find(job_id)
            return job is not None and job.status == JobStatus.QUEUED
        for job_id in await requeue_dead_claims(store.redis, store.keys, self.w, unstarted):
            await store.publish(job_id, "log", {
                "level": "warning",
                "message": "the worker that took this job from the queue died before "
                           "starting it; queued again for another worker"})
        return reaped

    def next_pass_in(self, interval: float) -> float:
        """Seconds until the next pass: sooner when a suspicion awaits its second look."""
        return min(interval, self.confirm_after) if self.suspects else interval


async def reap_orphans(outcomes: Outcomes, catalog: Catalog, orphan_after: float, *,
                       suspects: dict[str, float] | None = None,
                       confirm_after: float = 0.0) -> list[str]:
    """Fail each orphaned job through the one terminal path (audited, counted, notified).
    With `suspects` (kept between passes), a job is failed only once its heartbeat has
    been missing for `confirm_after` seconds of this process's own watching."""
    store = outcomes.store
    reaped = []
    running = await store.running_ids()
    if suspects is not None:
        for gone in set(suspects) - set(running):
            del suspects[gone]
    for job_id in running:
        if await store.redis.exists(store.keys.heartbeat(job_id)):
            if suspects is not None:
                suspects.pop(job_id, None)
            continue
        job = await store.find(job_id)
        if job is None:
            await rcmd.srem(store.redis, store.keys.running, job_id)
            continue
        if _age(job.started_at) < orphan_after:
            continue  # just started; its first heartbeat may be on its way
        if suspects is not None:
            first = suspects.setdefault(job_id, time.monotonic())
            if time.monotonic() - first < confirm_after:
                continue  # a second look first: Redis may have just come back
            del suspects[job_id]
        message = (f"the worker running this {job.kind} ({job.worker or 'unknown'}) stopped "
                   f"heartbeating for over {orphan_after:.0f}s and is presumed dead")
        error: JobError = {"code": "worker_lost", "message": message}
        if job.kind == JobKind.RESTORE:
            message, extra = _lost_restore(job, message)
            error.update(extra)
            error["message"] = message
        if await outcomes.end(job, [JobStatus.RUNNING], JobStatus.FAILED, error=error):
            for handle in (job.temp_handles or "").split():
                try:  # a temp file, or an unfinished multipart upload
                    await catalog.remove_temp(handle)
                except Exception as exc:
                    log.warning("job %s: could not remove %s: %s", job_id, handle, exc)
            await release_if_held_by(store.redis, store.keys.lock(job.target), job_id)
            reaped.append(job_id)
            log.warning("reaped orphaned job %s (%s on %s)", job_id, job.kind, job.target)
    return reaped


def _lost_restore(job: Job, message: str) -> tuple[str, JobError]:
    """What a lost restore left behind, from the state it recorded before each step (a
    partial JobError: code and message are the caller's)."""
    state, why = RESTORE_STATES.get(job.restore_state or "untouched", RESTORE_STATES["partial"])
    extra = cast(JobError, {"database_state": state, "safety_backup": job.safety_backup})
    message += f"; the restore was NOT re-run. Database {state}: {why}."
    if job.safety_backup:
        message += (f" Safety backup {job.safety_backup} holds the state before this "
                    "restore")
        if state != "unchanged":
            message += "; restore it to undo (see `undo`)"
            extra["undo"] = undo_hint(job.target, job.safety_backup,
                                      job.params.get("into_database"),
                                      job.params.get("tables"))
        message += "."
    elif state != "unchanged":
        message += " No safety backup was made for this restore."
    into = job.params.get("into_database")
    if into and not job.params.get("replace") and not job.safety_backup:
        # a restore beside into a new database: the worker may have created it
        message += (f" The new database {into} this restore was making beside the live "
                    "one (which it never touched) may be left behind, empty or partly "
                    "loaded: drop it, or restore into it again with \"replace\": true.")
        extra["leftover_database"] = str(into)
    return message, extra
