"""The scheduler tick every worker runs: due slots of target schedules become backup jobs.

Any number of workers tick; a slot's job is created through the idempotency path with a
deterministic key (`sched:<target>:<slot>`), so a slot runs once whatever the number of
workers and restarts. Per target, Redis keeps when the schedule was first seen (slots before
that are never run: configuring a nightly schedule at noon does not start a backup at once)
and the last slot handled. A slot missed while everything was down runs once at start-up
with `catch_up = "latest"` — the newest missed slot only, never one per missed slot — and
not at all with `catch_up = "none"`. After a scheduled backup succeeds, a prune job follows
(when the target has a retention policy); a daily prune runs too.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import UTC, datetime, timedelta

from arq.connections import ArqRedis

from shared import rcmd, schedules
from shared.audit import AuditLog
from shared.config import Settings, TargetConfig
from shared.jobs import Job, JobKind, JobParams, JobStatus, JobStore, Requester
from shared.keys import Keys
from shared.notify import Notifier
from shared.queue import enqueue

log = logging.getLogger("safehold.scheduler")
SCHEDULER: Requester = {"subject": "schedule", "client": "schedule"}
LATE_AFTER = timedelta(minutes=5)  # catch_up="none": a slot older than this is skipped


class Scheduler:
    def __init__(self, settings: Settings, redis: ArqRedis, store: JobStore,
                 notifier: Notifier | None = None, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.store = store
        self.keys = Keys(settings.redis.prefix)
        self.notifier = notifier
        self.audit = audit
        self._alerts: set[asyncio.Future[None]] = set()

    async def tick(self, now: datetime | None = None) -> list[str]:
        """Create the jobs of every due slot; returns their ids (empty when none is due)."""
        now = now or datetime.now(UTC)
        created = []
        for target in self.settings.targets.values():
            try:
                if target.schedule and (job := await self._backup_slot(target, now)):
                    created.append(job.id)
                if target.schedule:
                    await self._check_missed(target, now)
                if target.verify_schedule and (job := await self._verify_slot(target, now)):
                    created.append(job.id)
                    if target.pitr is not None and target.pitr.enabled:
                        # a PITR target's drill slot also recovers a random instant of
                        # its recovery window
                        created.append((await self._create(
                            target, JobKind.VERIFY,
                            f"pitrdrill:{target.id}:{job.params.get('scheduled_slot')}",
                            {**job.params, "point_in_time": "random"})).id)
                if self.settings.retains(target) and (job := await self._daily_prune(target,
                                                                                   now)):
                    created.append(job.id)
            except Exception:  # one target's trouble never stops the others
                log.exception("scheduling target %s failed", target.id)
        return created

    async def _backup_slot(self, target: TargetConfig, now: datetime) -> Job | None:
        return await self._slot(target, now, JobKind.BACKUP, target.schedule, "")

    async def _verify_slot(self, target: TargetConfig, now: datetime) -> Job | None:
        return await self._slot(target, now, JobKind.VERIFY, target.verify_schedule, "verify_")

    async def _slot(self, target: TargetConfig, now: datetime, kind: JobKind, expr: str,
                    field: str) -> Job | None:
        """The due slot of one schedule of a target (backups, or drills: `field` prefixes
        its state in the target's schedule hash) as a job, once."""
        tz = schedules.zone(target.timezone, "timezone")
        delay = schedules.jitter(target.id, target.schedule_jitter)
        key = self.keys.schedule(target.id)
        await rcmd.hsetnx(self.redis, key, f"{field}first_seen", now.isoformat())
        state = await rcmd.hgetall_text(self.redis, key)
        slot = schedules.latest_due(expr, tz, now, delay)
        if slot is None:
            return None
        name = schedules.slot_name(slot)
        due = schedules.to_utc(slot, tz) + delay
        last = state.get(f"{field}last_slot", "")
        if last >= name or due < datetime.fromisoformat(state[f"{field}first_seen"]):
            return None  # handled (maybe by another worker), or before the schedule existed
        if target.catch_up == "none" and now - due > LATE_AFTER:
            await rcmd.hset(self.redis, key, mapping={
                f"{field}last_slot": name, f"{field}last_skipped": name})
            log.warning("target %s: %s slot %s missed while down; skipped (catch_up=none)",
                        target.id, kind, name)
            return None
        busy = [j for j in await self.store.active_for_target(target.id)
                if j.kind == kind and j.params.get("scheduled_slot")]
        if busy:  # a slow backup never piles up slots behind it
            await rcmd.hset(self.redis, key, mapping={
                f"{field}last_slot": name, f"{field}last_skipped": name})
            log.warning("target %s: %s slot %s skipped: the scheduled job %s is still %s",
                        target.id, kind, name, busy[0].id, busy[0].status)
            return None
        params: JobParams = {"scheduled_slot": name,
                                  "scheduled_for": due.isoformat().replace("+00:00", "Z")}
        if kind == JobKind.BACKUP:
            params["compress"] = target.compress
            params["note"] = f"scheduled {name} {target.timezone}"
        prefix = "sched" if kind == JobKind.BACKUP else "drill"
        job = await self._create(target, kind, f"{prefix}:{target.id}:{name}", params)
        await rcmd.hset(self.redis, key, mapping={f"{field}last_slot": name,
                                            f"{field}last_job": job.id})
        return job

    async def _check_missed(self, target: TargetConfig, now: datetime) -> None:
        """Alert once when `missed_grace` (rounded up) scheduled slots have come due since
        the last successful backup — counted on the schedule itself, so a weekday or
        business-hours schedule does not alert over its quiet days. A success clears it."""
        tz = schedules.zone(target.timezone, "timezone")
        key = self.keys.schedule(target.id)
        state = await rcmd.hgetall_text(self.redis, key)
        since = state.get("last_success") or state.get("first_seen")
        if not since or state.get("missed_alerted"):
            return
        start = datetime.fromisoformat(since.replace("Z", "+00:00"))
        needed = max(1, math.ceil(target.missed_grace))
        horizon = now - timedelta(minutes=5)  # a backup gets a few minutes to finish
        due, missed = start, 0
        while missed < needed:
            due = schedules.next_due(target.schedule, tz, due)
            if due > horizon:
                return
            missed += 1
        if not await rcmd.hsetnx(self.redis, key, "missed_alerted",
                                       now.isoformat()):
            return  # another worker alerted
        hours = (now - start).total_seconds() / 3600
        message = (f"target {target.id} has had no successful backup for {hours:.1f} h: "
                   f"{missed} scheduled slots came due since (schedule {target.schedule!r} "
                   f"{target.timezone}, grace {target.missed_grace:g})")
        log.error(message)
        if self.audit is not None:
            await self.audit.record(action="schedule.missed", result="error",
                                    subject="schedule", target=target.id, detail=message)
        if self.notifier is not None:  # in the background: a slow channel never delays ticks
            task = asyncio.ensure_future(self.notifier.event("schedule.missed", target.id,
                                                             message))
            self._alerts.add(task)
            task.add_done_callback(self._alerts.discard)

    async def _daily_prune(self, target: TargetConfig, now: datetime) -> Job | None:
        at = self.settings.worker.daily_prune  # HH:MM in the target's zone, or "off"
        if at == "off":
            return None
        tz = schedules.zone(target.timezone, "timezone")
        hour, minute = (int(x) for x in at.split(":"))
        slot = schedules.latest_due(f"{minute} {hour} * * *", tz, now)
        if slot is None or now - schedules.to_utc(slot, tz) > timedelta(hours=1):
            return None
        return await self._create(target, JobKind.PRUNE, f"prune:{target.id}:{slot:%Y-%m-%d}",
                                  {"dry_run": False, "reason": "daily"})

    async def after_backup(self, job: Job) -> Job | None:
        """A scheduled backup succeeded: prune by the target's policy."""
        target = self.settings.targets.get(job.target)
        if target is None or not self.settings.retains(target) or \
                not job.params.get("scheduled_slot"):
            return None
        return await self._create(target, JobKind.PRUNE, f"prune-after:{job.id}",
                                  {"dry_run": False, "reason": f"after {job.id}"})

    async def _create(self, target: TargetConfig, kind: JobKind, idem: str,
                      params: JobParams) -> Job:
        job, created = await self.store.create(kind, target.id, params, SCHEDULER,
                                               idempotency_key=idem)
        if created or job.status == JobStatus.QUEUED:
            # again when only the create got through last time (arq ignores a job id it
            # already has, so this never runs a job twice)
            await enqueue(self.redis, self.keys, job)
        if created:
            log.info("scheduled %s job %s for target %s (%s)", kind, job.id, target.id, idem)
        return job
