"""Faults an unlucky operator meets, each ending with nothing lost and an honest job: the
database connection of a running dump is killed on the server; fifty clients send one
Idempotency-Key at once. Also: a queued job wakes an idle worker at once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.jobs import JobStore
from shared.queue import connect, enqueue
from tests import pg
from tests.helpers import (
    listing,
    start_backup_until_pg_dump,
    table_lock,
    wait_for,
    wait_for_terminal,
)


async def test_pg_terminate_backend_mid_dump_fails_the_job_and_keeps_nothing(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    await pg.load_rich(pg_db)
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        job_id, _ = await start_backup_until_pg_dump(api, pg_db)
        admin = await pg.admin_conn()
        try:
            async def dump_backend() -> list[Any]:
                return list(await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND "
                    "application_name = 'safehold' AND wait_event_type = 'Lock'", pg_db))
            rows = await wait_for(dump_backend, 30, "pg_dump's backend")
            for r in rows:
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", r["pid"])
        finally:
            await admin.close()
        job = await wait_for_terminal(api, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "dump_failed"
    assert "terminat" in job["error"]["message"].lower()
    assert await listing(api) == []
    assert [p for p in storage_dir.rglob("*") if p.is_file()] == []


async def test_fifty_clients_with_one_idempotency_key_make_one_job(api: Any,
                                                                   pg_db: str) -> None:
    headers = {"Idempotency-Key": "retry-storm-1"}
    answers = await asyncio.gather(*[
        api.post("/api/v1/targets/main/backups", json={}, headers=headers)
        for _ in range(50)])
    ids = {(await a.json())["id"] for a in answers}
    assert len(ids) == 1
    jobs = (await (await api.get("/api/v1/jobs?kind=backup")).json())["jobs"]
    assert [j["id"] for j in jobs] == list(ids)


async def test_a_queued_job_wakes_an_idle_worker_at_once(api: Any, settings: Settings,
                                                         redis: Any, pg_db: str) -> None:
    """A worker polls the queue at most every `poll_delay` seconds; between polls it waits
    on the doorbell, which every job queued rings (by the API, or `enqueue` as the
    scheduler does): with a 30 s poll delay, jobs still start at once, one after the
    other (each answered within 20 s), and the doorbell stays bounded and expiring."""
    from shared.keys import Keys
    from shared.queue import DOORBELL_MAX, DOORBELL_TTL_MS
    from worker.main import build_worker, stop_gracefully

    w = build_worker(settings, poll_delay=30)
    assert w.idle_s == 30 and w.doorbell  # type: ignore[attr-defined]
    task = asyncio.create_task(w.main())
    try:
        await asyncio.sleep(1)  # the worker is idle, inside its wait
        for _ in range(2):
            job = await (await api.post("/api/v1/targets/main/backups?wait=20",
                                        json={})).json()
            assert job["status"] == "succeeded", job
        keys = Keys(settings.redis.prefix)
        store = JobStore(redis, keys)
        queued, _ = await store.create("stats", "main", {}, {"subject": "scheduler"})
        pool = await connect(settings.redis.url)  # the scheduler's kind of connection
        try:
            await enqueue(pool, keys, queued)
        finally:
            await pool.aclose()
        assert (await wait_for_terminal(api, queued.id, timeout=20))["status"] == "succeeded"
        # what no idle worker took stays bounded and short-lived
        assert await redis.llen(keys.doorbell) <= DOORBELL_MAX
        assert await redis.pttl(keys.doorbell) in range(-2, DOORBELL_TTL_MS + 1)
    finally:
        await stop_gracefully(w, 10, task)


async def test_a_doorbell_redis_refuses_leaves_the_worker_polling(
        api: Any, settings: Settings, redis: Any, pg_db: str, caplog: Any) -> None:
    """Something else holds the doorbell's key (WRONGTYPE for BLPOP, as an ACL without
    blocking commands would refuse it): the worker says so once and polls instead; jobs
    still run."""
    from shared.keys import Keys
    from worker.main import build_worker, stop_gracefully

    keys = Keys(settings.redis.prefix)
    await redis.set(keys.doorbell, "not a list")
    w = build_worker(settings, poll_delay=0.05)
    task = asyncio.create_task(w.main())
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        assert "waiting on the doorbell" in caplog.text
        job = await (await api.post("/api/v1/targets/main/backups?wait=20", json={})).json()
        assert job["status"] == "succeeded", job  # the API's ring failed: logged, job queued
        store = JobStore(redis, keys)
        queued, _ = await store.create("stats", "main", {}, {"subject": "tester"})
        pool = await connect(settings.redis.url)
        try:
            await enqueue(pool, keys, queued)  # its ring fails too: logged, the job queued
        finally:
            await pool.aclose()
        assert (await wait_for_terminal(api, queued.id, timeout=20))["status"] == "succeeded"
    finally:
        await stop_gracefully(w, 10, task)
