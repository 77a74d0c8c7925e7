"""The queue contract between API and worker: job function names and how to enqueue.

arq stays behind this module so it could be swapped. The arq job id is our job id under
the prefix (`Keys.queued`), and the payload is only our id: the worker reads everything
else from the job record.
"""

from __future__ import annotations

import logging
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from shared.config import WorkerSettings
from shared.errors import ConfigError
from shared.jobs import Job, JobKind
from shared.keys import Keys

log = logging.getLogger("safehold.queue")

FUNCTIONS: dict[JobKind, str] = {kind: f"run_{kind.value}" for kind in JobKind}


def function_timeouts(w: WorkerSettings) -> dict[JobKind, float]:
    """Each job kind's arq timeout (seconds)."""
    return {JobKind.BACKUP: w.backup_timeout, JobKind.RESTORE: w.restore_timeout,
            JobKind.STATS: 120.0, JobKind.PRUNE: 3600.0, JobKind.VERIFY: w.restore_timeout,
            JobKind.PREVIEW: w.restore_timeout}


def claim_ttl(w: WorkerSettings) -> float:
    """How long arq's `in-progress` claim on a job lives when set (arq: the longest
    function timeout + 10 s); its remaining TTL tells how long ago a job was taken."""
    return max(function_timeouts(w).values()) + 10


def redis_settings(url: str) -> RedisSettings:
    s = RedisSettings.from_dsn(url)
    s.conn_retries = 1
    s.conn_timeout = 2
    return s


async def connect(url: str) -> ArqRedis:
    """An arq pool (a redis.asyncio.Redis) — fails with a clear message if Redis is down."""
    from shared.redact import redact_url

    try:
        pool = await create_pool(redis_settings(url))
        await pool.ping()
    except (OSError, ConnectionError, Exception) as exc:  # redis raises many kinds
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"Redis at {redact_url(url)} is not reachable ({type(exc).__name__}). "
            "Start it (e.g. `redis-server --port 6379`) or set [redis] url / SAFEHOLD_REDIS_URL."
        ) from None
    return pool


def stage_enqueue(pipe: Pipeline, keys: Keys, job: Job) -> None:
    """Queue `job` inside a caller's MULTI (JobStore.create's), so a job record and its
    queue entry are written together or not at all — what `ArqRedis.enqueue_job` writes,
    minus its WATCH/EXISTS round trips, needless for a job id that was just made."""
    from arq.constants import expires_extra_ms, job_key_prefix
    from arq.jobs import serialize_job
    from arq.utils import timestamp_ms

    now = timestamp_ms()
    pipe.psetex(job_key_prefix + keys.queued(job.id), expires_extra_ms,
                serialize_job(FUNCTIONS[job.kind], (job.id,), {}, None, now))
    pipe.zadd(keys.queue, {keys.queued(job.id): now})


DOORBELL_MAX, DOORBELL_TTL_MS = 64, 60_000


async def wake_worker(redis: Any, keys: Keys, job_id: str) -> None:
    """Ring the doorbell (see `Keys.doorbell`) after a job was queued: one idle worker
    picks it at once. Bounded and short-lived, as entries nobody takes mean only that no
    worker was idle; best effort, as the job is queued whatever happens here (a worker's
    next poll finds it)."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.lpush(keys.doorbell, b"1")
            pipe.ltrim(keys.doorbell, 0, DOORBELL_MAX - 1)
            pipe.pexpire(keys.doorbell, DOORBELL_TTL_MS)
            await pipe.execute()
    except RedisError as exc:
        log.warning("job %s is queued; waking a worker failed (%s)", job_id, exc)


async def enqueue(pool: ArqRedis, keys: Keys, job: Job) -> None:
    await pool.enqueue_job(FUNCTIONS[job.kind], job.id, _job_id=keys.queued(job.id),
                           _queue_name=keys.queue)
    await wake_worker(pool, keys, job.id)


async def requeue_dead_claims(redis: Any, keys: Keys, w: WorkerSettings,
                              is_unstarted: Any) -> list[str]:
    """Jobs that a worker took from the queue but died before starting (issue 20.7): arq's
    `in-progress` claim would hide them from every other worker until it expires (the
    longest job timeout: 12 h). A claim older than `orphan_after` whose job is still
    unstarted (`await is_unstarted(job_id)`: queued, no heartbeat) is dropped with arq's
    try counter, so the next free worker takes the job. It never runs twice: starting a
    job is one atomic queued -> running transition, whichever worker gets there first."""
    from arq.constants import in_progress_key_prefix, retry_key_prefix

    members = [m.decode() for m in await redis.zrange(keys.queue, 0, -1)]
    if not members:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for m in members:
            pipe.pttl(in_progress_key_prefix + m)
        ttls = await pipe.execute()
    ttl = claim_ttl(w)
    requeued = []
    for member, left_ms in zip(members, ttls, strict=True):
        if left_ms < 0 or ttl - left_ms / 1000 < w.orphan_after:
            continue  # not claimed, or claimed just now (its worker is starting it)
        job_id = keys.job_of_queued(member)
        if not await is_unstarted(job_id):
            continue
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(in_progress_key_prefix + member, retry_key_prefix + member)
            await pipe.execute()
        log.warning("job %s was taken from the queue %.0fs ago by a worker that never "
                    "started it (presumed dead); queued again", job_id,
                    ttl - left_ms / 1000)
        requeued.append(job_id)
    if requeued:
        await wake_worker(redis, keys, requeued[0])
    return requeued
