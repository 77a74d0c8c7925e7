"""The queue contract between API and worker: job function names and how to enqueue.

arq stays behind this module so it could be swapped. The arq job id is our job id, and the
payload is only that id: the worker reads everything else from the job record.
"""

from __future__ import annotations

import logging
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError

from shared.errors import ConfigError
from shared.jobs import Job
from shared.keys import Keys

log = logging.getLogger("safehold.queue")

FUNCTIONS = {"backup": "run_backup", "restore": "run_restore", "stats": "run_stats",
             "prune": "run_prune", "verify": "run_verify"}


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


def stage_enqueue(pipe: Any, keys: Keys, job: Job) -> None:
    """Queue `job` inside a caller's MULTI (JobStore.create's), so a job record and its
    queue entry are written together or not at all — what `ArqRedis.enqueue_job` writes,
    minus its WATCH/EXISTS round trips, needless for a job id that was just made."""
    from arq.constants import expires_extra_ms, job_key_prefix
    from arq.jobs import serialize_job
    from arq.utils import timestamp_ms

    now = timestamp_ms()
    pipe.psetex(job_key_prefix + job.id, expires_extra_ms,
                serialize_job(FUNCTIONS[job.kind], (job.id,), {}, None, now))
    pipe.zadd(keys.queue, {job.id: now})


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
    await pool.enqueue_job(FUNCTIONS[job.kind], job.id, _job_id=job.id, _queue_name=keys.queue)
    await wake_worker(pool, keys, job.id)
