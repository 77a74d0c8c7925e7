"""Orphan reaper: a `running` job whose worker stopped heartbeating is failed `worker_lost`.

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

from shared.backupstore import Catalog
from shared.jobs import RESTORE_STATES, Job, undo_hint
from shared.locks import release_if_held_by
from shared.outcomes import Outcomes

log = logging.getLogger("safehold.reaper")


def _age(iso: str | None) -> float:
    if not iso:
        return float("inf")
    return time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def reap_orphans(outcomes: Outcomes, catalog: Catalog,
                       orphan_after: float) -> list[str]:
    """Fail each orphaned job through the one terminal path (audited, counted, notified)."""
    store = outcomes.store
    reaped = []
    for job_id in await store.running_ids():
        if await store.redis.exists(store.keys.heartbeat(job_id)):
            continue
        job = await store.find(job_id)
        if job is None:
            await store.redis.srem(store.keys.running, job_id)  # type: ignore[misc]
            continue
        if _age(job.started_at) < orphan_after:
            continue  # just started; its first heartbeat may be on its way
        message = (f"the worker running this {job.kind} ({job.worker or 'unknown'}) stopped "
                   f"heartbeating for over {orphan_after:.0f}s and is presumed dead")
        error: dict[str, object] = {"code": "worker_lost"}
        if job.kind == "restore":
            message, extra = _lost_restore(job, message)
            error.update(extra)
        error["message"] = message
        if await outcomes.end(job, ["running"], "failed", error=error):
            for handle in (job.temp_handles or "").split():
                try:  # a temp file, or an unfinished multipart upload
                    await catalog.remove_temp(handle)
                except Exception as exc:
                    log.warning("job %s: could not remove %s: %s", job_id, handle, exc)
            await release_if_held_by(store.redis, store.keys.lock(job.target), job_id)
            reaped.append(job_id)
            log.warning("reaped orphaned job %s (%s on %s)", job_id, job.kind, job.target)
    return reaped


def _lost_restore(job: Job, message: str) -> tuple[str, dict[str, object]]:
    """What a lost restore left behind, from the state it recorded before each step."""
    state, why = RESTORE_STATES.get(job.restore_state or "untouched", RESTORE_STATES["partial"])
    extra: dict[str, object] = {"database_state": state, "safety_backup": job.safety_backup}
    message += f"; the restore was NOT re-run. Database {state}: {why}."
    if job.safety_backup:
        message += (f" Safety backup {job.safety_backup} holds the state before this "
                    "restore")
        if state != "unchanged":
            message += "; restore it to undo (see `undo`)"
            extra["undo"] = undo_hint(job.target, job.safety_backup)
        message += "."
    elif state != "unchanged":
        message += " No safety backup was made for this restore."
    return message, extra
