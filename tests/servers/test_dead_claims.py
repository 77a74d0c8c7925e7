"""Issue 20.7: a job taken from the queue by a worker that died before starting it.

arq claims a job (`arq:in-progress:<id>`, with a TTL of the longest job timeout + 10 s:
12 h by default) and counts a try (`arq:retry:<id>`) before our code runs; a worker
SIGKILLed between the two left the job `queued` for 12 h while other workers idled. The
state written here is exactly what such a worker leaves in Redis (arq's own key names and
TTL, from `shared.queue`); a real worker then has to take the job within
`orphan_after` + 10 s, and run it once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from arq.constants import in_progress_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from shared.config import Settings
from shared.keys import Keys
from shared.queue import claim_ttl
from tests import pg
from tests.helpers import listing, running_worker, wait_for_terminal


async def claim_as_a_dead_worker(redis: Redis, keys: Keys, settings: Settings, job_id: str,
                                 ago: float) -> None:
    queued = keys.queued(job_id)
    assert await redis.zscore(keys.queue, queued) is not None
    await redis.psetex(in_progress_key_prefix + queued,
                       int((claim_ttl(settings.worker) - ago) * 1000), b"1")
    await redis.incr(retry_key_prefix + queued)


async def test_a_job_claimed_by_a_dead_worker_is_taken_by_another(
        api: Any, redis: Redis, settings: Settings, prefix: str, pg_db: str,
        storage_dir: Path) -> None:
    await pg.load_rich(pg_db)
    keys = Keys(prefix)
    job_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
    await claim_as_a_dead_worker(redis, keys, settings, job_id, ago=2.0)
    t0 = time.monotonic()
    async with running_worker(settings):
        job = await wait_for_terminal(api, job_id, timeout=settings.worker.orphan_after + 30)
    took = time.monotonic() - t0
    assert job["status"] == "succeeded", job
    assert took < settings.worker.orphan_after + 10, took
    assert len(await listing(api)) == 1  # run once
    events = await (await api.get(f"/api/v1/jobs/{job_id}/events",
                                  headers={"Accept": "application/json"})).text()
    assert "died before starting it" in events


async def test_a_fresh_claim_and_a_started_job_are_left_alone(
        api: Any, redis: Redis, settings: Settings, prefix: str) -> None:
    """A claim younger than `orphan_after` belongs to a worker that is starting the job;
    a job that is no longer queued is not requeued (never run twice)."""
    from shared.queue import requeue_dead_claims

    keys = Keys(prefix)
    fresh = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
    await claim_as_a_dead_worker(redis, keys, settings, fresh, ago=0.5)
    started = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
    await claim_as_a_dead_worker(redis, keys, settings, started, ago=60)

    async def unstarted(job_id: str) -> bool:
        return job_id != started  # as if its worker moved it to running

    assert await requeue_dead_claims(redis, keys, settings.worker, unstarted) == []
    assert await redis.exists(in_progress_key_prefix + keys.queued(fresh))
    assert await redis.exists(in_progress_key_prefix + keys.queued(started))


async def test_arq_keys_carry_the_prefix(
        api: Any, worker: Any, redis: Redis, prefix: str, pg_db: str) -> None:
    """Every key a job leaves is under `redis.prefix`, or is one of arq's (fixed `arq:`
    start) with the prefix inside: two installations on one Redis never meet."""
    job = (await (await api.post("/api/v1/targets/main/backups?wait=60")).json())
    assert job["status"] == "succeeded", job
    found = [k.decode() async for k in redis.scan_iter(match=f"*{job['id']}*")]
    assert any(k.startswith("arq:") for k in found), found  # arq's try counter at least
    for k in found:
        assert k.startswith(f"{prefix}:") or (
            k.startswith("arq:") and f":{prefix}:{job['id']}" in k), k
