"""Redis goes away and comes back (a private redis-server on a free port, killed with
SIGKILL and restarted): the worker process rides it out, the API answers 503 with a code
while it is down (never 500), and both recover by themselves."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from shared.config import parse_settings
from tests import pg, procs
from tests.conftest import PASSWORD_ENV, bearer, make_raw_config
from tests.helpers import (
    REPO,
    start_backup_until_pg_dump,
    table_lock,
    wait_for,
    wait_for_terminal,
    write_toml,
)
from tests.support.redis_server import PrivateRedis, free_port
from tests.support.relay import Proxy


async def test_worker_and_api_ride_out_a_redis_restart(
        aiohttp_client: Any, private_redis: PrivateRedis, prefix: str, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    await pg.load_rich(pg_db)
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["redis"]["url"] = f"redis://127.0.0.1:{private_redis.port}/0"
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, raw)
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    log = tmp_path / "worker.log"
    with open(log, "wb") as sink:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "--config", str(cfg), "worker", cwd=REPO,
            env={**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}, stdout=sink, stderr=sink)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    try:
        async def ready() -> bool:
            return (await api.get("/readyz")).status == 200
        await wait_for(ready, 30, "the worker to announce itself")
        job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
        assert job["status"] == "succeeded", job

        await private_redis.kill()
        for path in ("/api/v1/jobs", f"/api/v1/jobs/{job['id']}", "/metrics"):
            resp = await api.get(path)
            assert resp.status == 503, (path, await resp.text())
            assert (await resp.json())["error"]["code"] == "redis_unavailable"
        submit = await api.post("/api/v1/targets/main/backups")
        assert submit.status == 503 and submit.headers["Retry-After"] == "5"
        ready_now = await api.get("/readyz")
        assert ready_now.status == 503
        await asyncio.sleep(4)  # several poll intervals with Redis gone
        assert worker.returncode is None, log.read_text()[-2000:]

        await private_redis.start()  # an empty Redis: as after a restart without persistence
        await wait_for(ready, 30, "the worker to come back by itself")
        again = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
        assert again["status"] == "succeeded", again
        text = log.read_text()
        assert "Redis is unreachable" in text and "Redis is reachable again" in text
        assert "Traceback" not in text, text[-3000:]
        worker.terminate()  # the shutdown says why (not arq's "shutdown on SIGUSR1")
        await asyncio.wait_for(worker.wait(), 30)
        text = log.read_text()
        assert "stopping (SIGTERM)" in text and "SIGUSR1" not in text, text[-2000:]
    finally:
        if worker.returncode is None:
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 30)


async def _worker_on(cfg: Path, log: Path) -> asyncio.subprocess.Process:
    with open(log, "wb") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "--config", str(cfg), "worker", cwd=REPO,
            env={**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}, stdout=sink, stderr=sink)


async def _stop(worker: asyncio.subprocess.Process) -> None:
    if worker.returncode is None:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)


async def test_a_running_backup_rides_out_a_redis_restart(
        aiohttp_client: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """Issue 20.3: Redis (AOF on) killed while a backup runs and back 7 s later — longer
    than the job's heartbeat TTL, so its heartbeat is gone when Redis returns. The dump
    finishes during the outage (its publishing, bookkeeping and outcome wait for Redis);
    the job ends `succeeded` as it would have, is not reaped, and its backup is listed."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    private = PrivateRedis(free_port(), redis_dir, aof=True)
    await private.start()
    await pg.load_rich(pg_db)
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["redis"]["url"] = f"redis://127.0.0.1:{private.port}/0"
    write_toml(cfg := tmp_path / "safehold.toml", raw)
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    worker = await _worker_on(cfg, log := tmp_path / "worker.log")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    try:
        await wait_for(lambda: _ready(api), 30, "the worker to announce itself")
        async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
            job_id, _ = await start_backup_until_pg_dump(api, pg_db)
            await asyncio.sleep(1.5)
            await private.kill()
        # the lock is released: pg_dump finishes while Redis is away
        await asyncio.sleep(7)
        await private.start()
        job = await wait_for_terminal(api, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        listed = await (await api.get("/api/v1/targets/main/backups")).json()
        assert [b["filename"] for b in listed["backups"]] == [job["result"]["filename"]]
        audit = await (await api.get("/api/v1/audit", params={"job": job_id})).json()
        assert [e["result"] for e in audit["entries"] if e["action"] == "job.backup"] == [
            "succeeded"]
        text = log.read_text()
        assert "Redis unreachable" in text and "Traceback" not in text, text[-3000:]
    finally:
        await _stop(worker)
        await private.kill()


async def test_past_the_grace_a_job_fails_redis_unavailable(
        aiohttp_client: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """A job that needs Redis (here: waiting for its target's lock) and cannot reach it
    for longer than `[worker] redis_grace` fails with the named code `redis_unavailable`
    — never `internal_error` — recorded, audited and counted once Redis is back."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    private = PrivateRedis(free_port(), redis_dir, aof=True)
    await private.start()
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db, redis_grace=2.0)
    raw["redis"]["url"] = f"redis://127.0.0.1:{private.port}/0"
    write_toml(cfg := tmp_path / "safehold.toml", raw)
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    worker = await _worker_on(cfg, log := tmp_path / "worker.log")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    try:
        await wait_for(lambda: _ready(api), 30, "the worker to announce itself")
        from redis.asyncio import Redis

        from shared.keys import Keys

        r = Redis.from_url(raw["redis"]["url"])
        await r.set(Keys(prefix).lock("main"), "another-job")  # held by someone else
        await r.aclose()
        job_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]

        async def waiting() -> bool:
            job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
            return job["progress"].get("phase") == "waiting_for_lock"
        await wait_for(waiting, 30, "the job to wait for the lock")
        await private.kill()
        await asyncio.sleep(5)  # over the 2 s grace
        await private.start()
        job = await wait_for_terminal(api, job_id, timeout=60)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "redis_unavailable", (job["error"],
                                                             log.read_text()[-4000:])
        assert "redis_grace" in job["error"]["message"]
        listed = await (await api.get("/api/v1/targets/main/backups")).json()
        assert listed["backups"] == []
        audit = await (await api.get("/api/v1/audit", params={"job": job_id})).json()
        assert any(e["action"] == "job.backup" and e["detail"] == "redis_unavailable"
                   for e in audit["entries"]), audit
    finally:
        await _stop(worker)
        await private.kill()


async def _ready(api: Any) -> bool:
    return bool((await api.get("/readyz")).status == 200)


async def test_redis_lost_at_commit_leaves_a_pg_restore_unchanged(
        api: Any, worker: Any, pg_db: str, settings: Any, storage_dir: Path) -> None:
    """The stage `committing` is written to the job record before COMMIT is sent; when
    Redis stays away past the grace right then, the load fails `redis_unavailable` with
    the database unchanged (no COMMIT was sent), never `internal_error` (which would roll a
    never-changed database back from the safety backup)."""
    from shared.errors import RestoreFailed
    from shared.outage import RedisUnavailable
    from tests.helpers import backup
    from worker.engines.postgresql import PostgreSQL
    from worker.pipeline import stored_plain
    from worker.progress import Progress

    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    conn = await pg.user_conn(pg_db)
    await conn.execute("DELETE FROM everything WHERE id < 50")  # a state to keep
    await conn.close()
    before = await pg.fingerprint(pg_db)

    async def lost(stage: str) -> None:
        if stage == "committing":
            raise RedisUnavailable("Redis was unreachable for over 60s while recording it")

    manifest = json.loads((storage_dir / f"{name}.json").read_text())
    from shared import codecs
    from shared.storage.local import LocalStorage

    store = LocalStorage(settings.storage.path)
    chunks = stored_plain(store.open("main", name), codecs.chain_of(manifest),
                          limit=1 << 30, expect_sha256=manifest["sha256"], identities=[])
    with pytest.raises(RestoreFailed) as caught:
        await PostgreSQL().restore(settings.target("main"), chunks,
                                   Progress(on_stage=lost), clean=True, manifest=manifest)
    assert caught.value.code == "redis_unavailable" and caught.value.database_unchanged
    assert await pg.fingerprint(pg_db) == before


async def test_a_worker_cut_off_alone_commits_nothing_after_being_taken_for_lost(
        aiohttp_client: Any, private_redis: PrivateRedis, prefix: str, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    """Only the worker loses Redis (a partition) while its restore waits for an
    application's lock: the API, which still reaches Redis, fails the job `worker_lost`
    with `database_state: unchanged`. The application lets go, the load runs on — and at
    COMMIT the job finds it is no longer its own and commits nothing: the record stays
    true. (Without that check the database was replaced behind an "unchanged".)"""
    await pg.load_rich(pg_db)
    proxy = Proxy(private_redis.port)
    await proxy.start()
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["redis"]["url"] = f"redis://127.0.0.1:{proxy.port}/0"
    write_toml(cfg := tmp_path / "safehold.toml", raw)
    worker = await _worker_on(cfg, tmp_path / "worker.log")
    raw["redis"]["url"] = f"redis://127.0.0.1:{private_redis.port}/0"  # the API: direct
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    try:
        await wait_for(lambda: _ready(api), 30, "the worker to announce itself")
        job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
        assert job["status"] == "succeeded", job
        conn = await pg.user_conn(pg_db)
        await conn.execute("DELETE FROM everything WHERE id < 100")  # the state to keep
        await conn.close()
        before = await pg.fingerprint(pg_db)
        async with table_lock(pg_db, "everything", "ACCESS SHARE"):
            job_id = (await (await api.post("/api/v1/targets/main/restores", json={
                "backup": job["result"]["filename"]})).json())["id"]

            async def waiting() -> bool:
                j = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
                return bool(j["progress"].get("waiting_for"))
            await wait_for(waiting, 60, "the restore to wait for the application's lock")
            await proxy.cut()
            lost = await wait_for_terminal(api, job_id, timeout=60)  # reaped by the API
            assert lost["error"]["code"] == "worker_lost", lost
            assert lost["error"]["database_state"] == "unchanged", lost
        old_port = proxy.port  # the application let go; the worker's link comes back
        proxy = Proxy(private_redis.port)
        proxy.port = old_port
        await proxy.start()
        await wait_for(lambda: not procs.find("psql", {"PGDATABASE": pg_db}), 60,
                       "the restore's psql to end")
        assert await pg.fingerprint(pg_db) == before  # nothing committed
        final = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        assert final["error"]["database_state"] == "unchanged", final
        assert "taken for lost" in (tmp_path / "worker.log").read_text()
    finally:
        await _stop(worker)
