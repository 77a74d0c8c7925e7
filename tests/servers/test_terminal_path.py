"""One terminal path (issue 20.1): a job ended by the reaper (its worker SIGKILLed) or
cancelled before it started is audited, counted in /metrics and notified like one its
worker ended."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from api.app import create_app
from tests import pg
from tests.conftest import bearer
from tests.helpers import (
    start_backup_until_pg_dump,
    table_lock,
    wait_for,
    wait_for_terminal,
    worker_process,
)
from tests.servers.test_notify import Receiver, notify_settings


def events(receiver: Receiver) -> list[dict[str, Any]]:
    return [json.loads(body) for _, _, body in receiver.requests]


async def audit_entries(api: Any, job_id: str) -> list[dict[str, Any]]:
    body = await (await api.get("/api/v1/audit", params={"job": job_id})).json()
    return [e for e in body["entries"] if e.get("job") == job_id]


async def jobs_metric(api: Any, kind: str, status: str) -> float:
    text = await (await api.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith("safehold_jobs_total{") and f'kind="{kind}"' in line and \
                f'status="{status}"' in line and 'target="main"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_reaped_backup_is_audited_counted_and_notified(
        aiohttp_server: Any, aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    settings = notify_settings(prefix, tmp_path, pg_db, test_env, str(server.make_url("/h")))
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    await pg.load_rich(pg_db)
    proc = await worker_process(tmp_path, prefix, pg_db)
    try:
        async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
            job_id, _ = await start_backup_until_pg_dump(api, pg_db)
            proc.kill()  # as the OOM killer does: nothing of the worker runs on
            await proc.wait()
        job = await wait_for_terminal(api, job_id, timeout=70)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    outcome = [e for e in await audit_entries(api, job_id) if e["action"] == "job.backup"]
    assert len(outcome) == 1, outcome
    assert outcome[0]["result"] == "failed" and outcome[0]["detail"] == "worker_lost"
    assert outcome[0]["subject"] == "tester"
    await wait_for(lambda: any(e["event"] == "backup.failed" for e in events(receiver)), 20,
                   "the backup.failed notification")
    failed = [e for e in events(receiver) if e["event"] == "backup.failed"]
    assert len(failed) == 1 and failed[0]["data"]["job"] == job_id
    assert failed[0]["data"]["error"]["code"] == "worker_lost"
    assert await jobs_metric(api, "backup", "failed") == 1


async def test_a_job_cancelled_before_it_started_is_audited_counted_and_notified(
        aiohttp_server: Any, aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    settings = notify_settings(prefix, tmp_path, pg_db, test_env, str(server.make_url("/h")))
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    # no worker runs: the backup stays queued until it is cancelled
    job_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
    resp = await api.delete(f"/api/v1/jobs/{job_id}")
    job = await resp.json()
    assert resp.status == 200 and job["status"] == "cancelled", job
    outcome = [e for e in await audit_entries(api, job_id) if e["action"] == "job.backup"]
    assert [e["result"] for e in outcome] == ["cancelled"]
    await wait_for(lambda: any(e["event"] == "backup.cancelled" for e in events(receiver)),
                   20, "the backup.cancelled notification")
    assert await jobs_metric(api, "backup", "cancelled") == 1
    again = await api.delete(f"/api/v1/jobs/{job_id}")
    assert again.status == 409 and (await again.json())["error"]["code"] == "job_finished"
    assert len([e for e in await audit_entries(api, job_id)
                if e["action"] == "job.backup"]) == 1  # once, not per cancel request
