"""The one terminal path (DESIGN.md §2): whoever ends a job — its worker, the reaper that
finds it orphaned, a cancel before it started, a shutdown — ends it here, and the outcome
is recorded (one atomic transition), audited, counted in `/metrics` and notified. Nothing
else may move a job to `succeeded`, `failed` or `cancelled`.

Each follow-up is retried across a Redis outage on its own (so none runs twice) and none
changes the recorded outcome. Notifications go out in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime

from redis.asyncio import Redis

from shared import rcmd, stats
from shared.audit import AuditLog
from shared.config import Settings
from shared.errors import Conflict
from shared.jobs import Job, JobError, JobKind, JobResult, JobStatus, JobStore, now_iso
from shared.keys import Keys
from shared.manifests import count_in
from shared.notify import Notifier
from shared.outage import ride_out

log = logging.getLogger("safehold.outcomes")
FOLLOW_UP_RETRY_FOR = 60.0  # seconds each follow-up retries across a Redis outage

Step = tuple[str, Callable[[], Awaitable[object]]]


class Outcomes:
    def __init__(self, settings: Settings, redis: Redis, store: JobStore,
                 audit: AuditLog, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.keys: Keys = store.keys
        self.store = store
        self.audit = audit
        self.notifier = notifier or Notifier(settings, record_failure=self.notification_failed)
        if self.notifier.record_failure is None:
            self.notifier.record_failure = self.notification_failed
        self._deliveries: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ ending a job
    async def end(self, job: Job, allowed_from: Iterable[JobStatus], status: JobStatus, *,
                  result: JobResult | None = None,
                  error: JobError | None = None,
                  fields: Mapping[str, object] | None = None,
                  data: Mapping[str, object] | None = None,
                  retry_for: float = 0.0,
                  also: Sequence[Step] = ()) -> bool:
        """Move `job` to `status` if it is still in `allowed_from`; then audit, count and
        notify it (and run `also`). False when someone else ended it first (nothing then
        is audited twice)."""
        allowed = list(allowed_from)
        all_fields: dict[str, object] = {"finished_at": now_iso(), **(fields or {})}
        payload: dict[str, object] = dict(data or {})
        if result is not None:
            all_fields["result"] = payload["result"] = result
        if error is not None:
            all_fields["error"] = payload["error"] = error
        ended = await ride_out(
            f"job {job.id}: recording its outcome",
            lambda: self.store.transition(job.id, allowed, status, fields=all_fields,
                                          data=payload),
            retry_for)
        if ended:
            await self.follow_ups(job, status, result, error, also)
        return bool(ended)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once (an outcome like any other); flag a running one for
        its worker, which ends it."""
        job = await self.store.get(job_id)
        if job.terminal:
            raise Conflict(f"job {job_id} already {job.status}", code="job_finished")
        error: JobError = {"code": "cancelled", "message": "cancelled before it started"}
        if job.kind == JobKind.RESTORE:
            error["database_state"] = "unchanged"
        if job.status == JobStatus.QUEUED and await self.end(
                job, [JobStatus.QUEUED], JobStatus.CANCELLED, error=error,
                fields={"cancel_requested": "1"},
                data={"reason": "cancelled before it started"}):
            return await self.store.get(job_id)
        await rcmd.hset(self.redis, self.keys.job(job_id), "cancel_requested", "1")
        await self.store.publish(job_id, "log", {"message": "cancellation requested"})
        return await self.store.get(job_id)

    # ------------------------------------------------------------------ follow-ups
    async def follow_ups(self, job: Job, status: str, result: JobResult | None,
                         error: JobError | None, also: Sequence[Step] = ()) -> None:
        who = {"subject": job.requested_by.get("subject"),
               "client": job.requested_by.get("client"), "via": job.requested_by.get("via")}
        result = result or {}
        backup = _text(result.get("filename")) or job.params.get("backup")
        steps: list[Step] = [
            ("audit", lambda: self.audit.record(
                action=f"job.{job.kind}", result=status, **who, target=job.target,
                job=job.id, backup=backup, detail=error["code"] if error else None)),
            ("stats", lambda: self._count(job, status, result))]
        if result.get("partial"):
            stored = _listed(result.get("stored_on"))
            missing = [n for n in _listed(result.get("destinations")) if n not in stored]
            steps.append(("audit", lambda: self.audit.record(
                action="backup.partial", result="warning", **who, target=job.target,
                job=job.id, backup=backup, detail="missing on " + ",".join(missing))))
        steps.extend(also)
        self._notify(job, status, result, error)
        for what, step in steps:
            try:
                await ride_out(f"job {job.id}: {what}", step, FOLLOW_UP_RETRY_FOR)
            except Exception:
                log.exception("job %s: its outcome is recorded; the %s after it failed",
                              job.id, what)

    async def _count(self, job: Job, status: str, result: JobResult) -> None:
        took = 0.0
        if job.started_at:
            took = (datetime.now(UTC) - datetime.fromisoformat(
                job.started_at.replace("Z", "+00:00"))).total_seconds()
        target = self.settings.targets.get(job.target)
        await stats.job_finished(
            self.redis, self.keys, kind=job.kind, status=status, target=job.target,
            engine=target.engine if target else "unknown", duration=max(took, 0.0),
            stored_bytes=(count_in(result, "size_bytes") or 0)
            if job.kind == JobKind.BACKUP else 0)

    def _notify(self, job: Job, status: str, result: JobResult,
                error: JobError | None) -> None:
        if job.kind == JobKind.STATS or (job.kind == JobKind.PREVIEW and
                                         status == JobStatus.SUCCEEDED):
            return  # a question answered is no news; a preview that failed is
        event = f"{job.kind}.{status}"
        what = _text(result.get("filename")) or job.params.get("backup") or ""
        if status == JobStatus.SUCCEEDED and result.get("partial"):
            event = "backup.partial"
        if job.kind == JobKind.PRUNE and status == JobStatus.SUCCEEDED:
            per_destination = result.get("destinations")
            deleted = [f for d in (per_destination.values()
                                   if isinstance(per_destination, dict) else [])
                       if isinstance(d, dict) for f in _listed(d.get("deleted"))]
            if result.get("dry_run") or not deleted:
                return
            event = "prune.deleted"
            what = f"{len(deleted)} backup copies deleted"
        message = f"{job.kind} of target {job.target} {status}" + (f": {what}" if what else "")
        if error:
            message += f" — {error.get('code')}: {error.get('message')}"
            if error.get("database_state"):
                message += f" (database {error['database_state']})"
        self.deliver(self.notifier.event(event, job.target, message, {
            "job": job.id, "kind": job.kind, "status": status, "backup": what or None,
            "error": {k: error.get(k) for k in ("code", "message", "database_state")}
            if error else None}))
        target = self.settings.targets.get(job.target)
        if target and target.heartbeat_url and job.kind == JobKind.BACKUP and \
                job.params.get("scheduled_slot"):
            self.deliver(self.notifier.heartbeat(
                target.heartbeat_url, "success" if status == JobStatus.SUCCEEDED else "fail"))

    def deliver(self, coro: Awaitable[None]) -> None:
        """Notifications go out in the background: delivery never delays or changes a job."""
        task = asyncio.ensure_future(coro)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def notification_failed(self, channel: str, event: str, error: str) -> None:
        await self.redis.incr(self.keys.counter("notifications_failed"))
        await self.audit.record(action="notification.failed", result="error",
                                detail=f"{channel} {event}: {error or 'no cause given'}")

    async def close(self) -> None:
        """Let notifications in flight finish (briefly) before the process exits."""
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=5)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _listed(value: object) -> list[str]:
    """The names a result lists (a list of them, or a dict keyed by them)."""
    return [str(v) for v in value] if isinstance(value, list | dict) else []
