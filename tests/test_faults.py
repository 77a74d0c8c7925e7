"""Faults an unlucky operator meets, each ending with nothing lost and an honest job: the
database connection of a running dump is killed on the server; fifty clients send one
Idempotency-Key at once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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
