"""Failure paths: nothing is lost, nothing false is reported."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests import pg, procs
from tests.helpers import (
    backup,
    flip_byte,
    listing,
    publish_plain,
    start_backup_until_pg_dump,
    stored_bytes,
    stored_manifest,
    table_lock,
    temp_files,
    wait_for,
    wait_for_terminal,
    worker_process,
)

REPO = Path(__file__).resolve().parents[2]


async def test_checksum_mismatch_refuses_and_touches_nothing(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """A backup whose bytes no longer match its manifest is refused before anything runs."""
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    path = storage_dir / name
    flip_byte(path, path.stat().st_size // 2)
    conn = await pg.user_conn(pg_db)
    await conn.execute("DELETE FROM everything WHERE id < 100")
    await conn.close()
    damaged = await pg.fingerprint(pg_db)

    resp = await api.post("/api/v1/targets/main/restores?wait=60", json={"backup": name})
    job = await resp.json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "checksum_mismatch"
    assert await pg.fingerprint(pg_db) == damaged
    assert await listing(api) == [name]  # no safety backup was even taken


async def test_broken_sql_fails_and_data_survives(api: Any, worker: Any, pg_db: str,
                                                  storage_dir: Path) -> None:
    """An SQL error mid-file fails the job (no false success) and the data is intact."""
    await pg.load_rich(pg_db)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    sql = gzip.decompress(await stored_bytes(storage_dir, good))
    cut = sql.index(b"COPY public.everything")
    broken = sql[:cut] + b"SELECT * FROM this_table_does_not_exist;\n" + sql[cut:]
    bad = "backup_postgresql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, broken, manifest)
    before = await pg.fingerprint(pg_db)

    resp = await api.post("/api/v1/targets/main/restores?wait=60", json={"backup": bad})
    job = await resp.json()
    assert job["status"] == "failed", job
    err = job["error"]
    assert err["code"] == "restore_failed"
    assert "this_table_does_not_exist" in err["message"]
    assert err["database_state"] == "unchanged"
    assert err["safety_backup"].startswith("safety_backup_")
    assert await pg.fingerprint(pg_db) == before


async def test_killed_psql_leaves_database_unchanged(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """psql killed before Safehold sent COMMIT: the server rolls the restore back, and the
    job says so (no rollback from the safety backup is needed)."""
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    conn = await pg.user_conn(pg_db)
    await conn.execute("UPDATE everything SET n = 0 WHERE id < 50")  # the state to return to
    await conn.close()
    current = await pg.fingerprint(pg_db)

    async with table_lock(pg_db, "everything", "ACCESS SHARE"):
        resp = await api.post("/api/v1/targets/main/restores", json={"backup": name})
        job_id = (await resp.json())["id"]
        # the safety backup passes the share lock; psql then waits on DROP SCHEMA
        pids = await wait_for(lambda: procs.find("psql", {"PGDATABASE": pg_db}), 60,
                              "psql to start")
        os.kill(pids[0], signal.SIGKILL)
    job = await wait_for_terminal(api, job_id)
    err = job["error"]
    assert job["status"] == "failed"
    assert err["database_state"] == "unchanged", err
    assert err["rollback"] is None and err["safety_backup"].startswith("safety_backup_")
    assert await pg.fingerprint(pg_db) == current


async def test_cancel_running_backup_leaves_nothing(api: Any, worker: Any, pg_db: str,
                                                   storage_dir: Path) -> None:
    """Cancelling a running backup stops pg_dump and keeps no file, temp or listed."""
    await pg.load_rich(pg_db)
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        job_id, pids = await start_backup_until_pg_dump(api, pg_db)
        assert temp_files(storage_dir)
        resp = await api.delete(f"/api/v1/jobs/{job_id}")
        assert resp.status == 202
        job = await wait_for_terminal(api, job_id)
    assert job["status"] == "cancelled"
    assert job["error"]["code"] == "cancelled"
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert list(storage_dir.iterdir()) == []
    resp = await api.delete(f"/api/v1/jobs/{job_id}")
    assert resp.status == 409


async def test_cancel_queued_job_never_starts(api: Any, pg_db: str, storage_dir: Path,
                                              settings: Any, redis: Any) -> None:
    """A job cancelled while queued is skipped when a worker picks it up."""
    resp = await api.post("/api/v1/targets/main/backups")
    job_id = (await resp.json())["id"]
    resp = await api.delete(f"/api/v1/jobs/{job_id}")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "cancelled"
    from worker.main import build_worker

    w = build_worker(settings, burst=True, poll_delay=0.05)
    await w.main()
    await w.close()
    job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert job["status"] == "cancelled" and job["started_at"] is None
    assert not storage_dir.exists() or list(storage_dir.iterdir()) == []


async def test_password_never_in_argv(api: Any, worker: Any, pg_db: str) -> None:
    """pg_dump's command line carries no password (it is only in the child's environment)."""
    await pg.load_rich(pg_db)
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        job_id, pids = await start_backup_until_pg_dump(api, pg_db)
        argv = procs.cmdline(pids[0])
        assert pg.TEST_PASSWORD.encode() not in argv
        assert pg_db.encode() not in argv  # connection details travel in PG* variables
    job = await wait_for_terminal(api, job_id)
    assert job["status"] == "succeeded"
    assert pg.TEST_PASSWORD not in json.dumps(job)


@pytest.mark.slow  # (tests/slow holds whole modules of these)
async def test_sigkill_worker_mid_backup_is_reaped(api: Any, pg_db: str, prefix: str,
                                                   tmp_path: Path, storage_dir: Path) -> None:
    """A worker killed mid-backup: job failed `worker_lost` within 60 s, no partial backup."""
    await pg.load_rich(pg_db)
    proc = await worker_process(tmp_path, prefix, pg_db)
    try:
        async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
            job_id, _ = await start_backup_until_pg_dump(api, pg_db)
            assert temp_files(storage_dir)
            proc.kill()
            killed_at = time.monotonic()
            await proc.wait()
        job = await wait_for_terminal(api, job_id, timeout=70)
        took = time.monotonic() - killed_at
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost"
    assert took < 60, f"reaped after {took:.1f}s"
    # the reaper removes the dead job's temp file right after recording its outcome (never
    # listed meanwhile: only a manifest lists a backup)
    await wait_for(lambda: temp_files(storage_dir) == [], 10, "the temp file to be removed")
    assert await listing(api) == []


async def test_jobs_on_one_target_run_one_at_a_time(api: Any, worker: Any, pg_db: str
                                                    ) -> None:
    """A restore never overlaps a backup of the same target: the second waits for the lock."""
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        first, _ = await start_backup_until_pg_dump(api, pg_db)
        second = (await (await api.post("/api/v1/targets/main/restores",
                                        json={"backup": name})).json())["id"]

        async def waiting() -> bool:
            job = await (await api.get(f"/api/v1/jobs/{second}")).json()
            return job["progress"].get("phase") == "waiting_for_lock"

        await wait_for(waiting, 10, "the restore to wait for the lock")
    a = await wait_for_terminal(api, first)
    b = await wait_for_terminal(api, second)
    assert a["status"] == b["status"] == "succeeded"
    assert b["started_at"] >= a["started_at"]
    assert (await (await api.get(f"/api/v1/jobs/{second}")).json())["progress"]["phase"] \
        != "waiting_for_lock"


@pytest.mark.slow  # (tests/slow holds whole modules of these)
async def test_sigterm_lets_a_running_backup_finish(api: Any, pg_db: str, prefix: str,
                                                    tmp_path: Path) -> None:
    """On SIGTERM a worker stops taking jobs but finishes the running one, then exits 0."""
    await pg.load_rich(pg_db)
    proc = await worker_process(tmp_path, prefix, pg_db, shutdown_grace=30.0)
    try:
        async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
            job_id, _ = await start_backup_until_pg_dump(api, pg_db)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert proc.returncode is None  # still finishing its job
            queued_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
        rc = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 0
    job = await wait_for_terminal(api, job_id)
    assert job["status"] == "succeeded"
    queued = await (await api.get(f"/api/v1/jobs/{queued_id}")).json()
    assert queued["status"] == "queued"  # left for the next worker, not lost


async def test_old_pg_dump_is_refused_clearly(api: Any, worker: Any, pg_db: str,
                                              tmp_path: Path, monkeypatch: Any) -> None:
    """A pg_dump older than the server fails the backup with a message saying what to install."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    (fake / "pg_dump").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    job = await (await api.post("/api/v1/targets/main/backups?wait=30")).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "tool_too_old"
    assert "pg_dump 9 is older than the PostgreSQL 15 server" in job["error"]["message"]


async def test_restore_tools_get_only_their_own_environment(
        api: Any, worker: Any, pg_db: str, monkeypatch: Any) -> None:
    """psql sees its own target's connection and nothing else of the worker's environment
    (another target's password included)."""
    monkeypatch.setenv("OTHER_TARGET_PASSWORD", "canary-Pw-0c1d")
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    async with table_lock(pg_db, "everything", "ACCESS SHARE"):
        job_id = (await (await api.post("/api/v1/targets/main/restores",
                                        json={"backup": name})).json())["id"]
        pids = await wait_for(lambda: procs.find("psql", {"PGDATABASE": pg_db}), 60,
                              "psql to start")
        environ = (Path(f"/proc/{pids[0]}/environ")).read_bytes()
    job = await wait_for_terminal(api, job_id)
    assert job["status"] == "succeeded", job
    names = {item.split(b"=", 1)[0].decode() for item in environ.split(b"\0") if item}
    assert b"canary-Pw-0c1d" not in environ
    assert names <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR",
                     "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGCONNECT_TIMEOUT",
                     "PGAPPNAME", "PGSSLMODE", "PGPASSWORD",
                     "PGSYSCONFDIR"}, names  # the last: set by Debian's pg_wrapper itself
