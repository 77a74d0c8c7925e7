"""The seed-compatible `/backup/*` surface, and the seed README's own scripts run with
curl and jq against a running server."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from api.app import create_app
from tests import pg
from tests.conftest import bearer, token
from tests.helpers import flip_byte, publish_plain, stored_bytes, stored_manifest

SCRIPTS = Path(__file__).resolve().parents[1] / "seed_scripts"


async def run_script(api: Any, settings: Any, name: str, cwd: Path,
                     replace_text: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a seed script as written, pointed at the test server, with an operator+ token."""
    text = (SCRIPTS / name).read_text()
    text = text.replace("http://localhost:8081", str(api.make_url("")).rstrip("/"))
    for a, b in (replace_text or {}).items():
        text = text.replace(a, b)
    script = cwd / name
    script.write_text(text)
    env = {**os.environ, "ACCESS_TOKEN": token(settings, "admin"),
           "PATH": f"{SCRIPTS}:{os.environ['PATH']}", "FAKE_S3_DIR": str(cwd / "s3")}
    proc = await asyncio.create_subprocess_exec(
        "bash", str(script), cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def damage(db: str) -> None:
    conn = await pg.user_conn(db)
    await conn.execute("DELETE FROM everything WHERE id % 2 = 0; DROP TABLE audit CASCADE")
    await conn.close()


async def test_quick_start(api: Any, worker: Any, settings: Any, pg_db: str, tmp_path: Path,
                           storage_dir: Path) -> None:
    """Create (compressed), download with -O, restore with a safety backup."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    rc, out, err = await run_script(api, settings, "quick_start.sh", tmp_path)
    assert rc == 0, err
    created = json.loads((tmp_path / "create.json").read_text())
    assert created["success"] is True
    name = created["filename"]
    assert created["message"] == f"Backup created successfully: {name}"
    assert isinstance(created["size_mb"], float)
    assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == \
        (await stored_manifest(storage_dir, name))["sha256"]
    restored = json.loads(out)
    assert restored["success"] is True
    assert restored["message"] == f"Database restored successfully from: {name}"
    assert restored["safety_backup_created"] is True
    assert restored["safety_backup_filename"].startswith("safety_backup_postgresql_")
    assert await pg.fingerprint(pg_db) == before


async def test_complete_backup_workflow(api: Any, worker: Any, settings: Any, pg_db: str,
                                        tmp_path: Path) -> None:
    """Create, download with -o, copy to (a local stand-in for) S3."""
    rc, out, err = await run_script(api, settings, "complete_backup_workflow.sh", tmp_path)
    assert rc == 0, err
    name = out.splitlines()[0].removeprefix("Created backup: ")
    assert name.startswith("backup_postgresql_") and name.endswith(".sql.gz")
    assert (tmp_path / name).read_bytes() == (tmp_path / "s3" / "my-backups" / name).read_bytes()
    assert "Uploaded to S3" in out


async def test_restore_workflow(api: Any, worker: Any, settings: Any, pg_db: str,
                                tmp_path: Path) -> None:
    """List with jq, then restore a chosen backup (default: with a safety backup)."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    name = (await (await api.post("/backup/create")).json())["filename"]
    await damage(pg_db)
    rc, out, err = await run_script(api, settings, "restore_workflow.sh", tmp_path,
                                    {"backup_postgresql_20241110_120000.sql.gz": name})
    assert rc == 0, err
    assert '"total_count": 1' in out  # jq's pretty print of the list
    assert f"Database restored successfully from: {name}" in out
    assert await pg.fingerprint(pg_db) == before


async def test_restore_from_external_backup(api: Any, worker: Any, settings: Any, pg_db: str,
                                            tmp_path: Path, storage_dir: Path) -> None:
    """Fetch a file from S3, upload-and-restore it with -F file=@…"""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    name = (await (await api.post("/backup/create")).json())["filename"]
    bucket = tmp_path / "s3" / "my-backups"
    bucket.mkdir(parents=True)
    shutil.copy(storage_dir / name, bucket / "backup_postgresql_20241110_120000.sql.gz")
    await damage(pg_db)
    rc, out, err = await run_script(api, settings, "restore_external.sh", tmp_path)
    assert rc == 0, err
    body, end = json.JSONDecoder().raw_decode(out)  # curl prints no newline after it
    assert out[end:].strip() == "Database restored from external backup"
    assert body["success"] is True
    assert body["message"] == "Database restored successfully from uploaded file: backup.sql.gz"
    assert await pg.fingerprint(pg_db) == before
    listing = await (await api.get("/backup/list")).json()
    assert any(b["filename"].startswith("upload_postgresql_") for b in listing["backups"])


async def test_rotation_script_corrected(api: Any, worker: Any, settings: Any, pg_db: str,
                                         tmp_path: Path, storage_dir: Path) -> None:
    """The rotation script (with GNU date fixed) deletes backups older than 7 days only."""
    proc = await asyncio.create_subprocess_exec(
        "date", "-d", "20241110_120000", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    assert await proc.wait() != 0  # the seed's line, as printed, fails on GNU date
    fresh = (await (await api.post("/backup/create")).json())["filename"]
    manifest = await stored_manifest(storage_dir, fresh)
    old = ["backup_postgresql_20200101_000000.sql.gz", "backup_postgresql_20231231_235959.sql.gz"]
    sql = gzip.decompress(await stored_bytes(storage_dir, fresh))
    for name in old:
        await publish_plain(storage_dir, name, sql, manifest)
    rc, out, err = await run_script(api, settings, "rotation.sh", tmp_path)
    assert rc == 0, err
    # curl prints the JSON answer without a newline, so the echo follows it on the line
    assert sorted(re.findall(r"Deleted old backup: (\S+)", out)) == old
    assert out.count('"success": true') == 2
    left = [b["filename"] for b in (await (await api.get("/backup/list")).json())["backups"]]
    assert left == [fresh]


async def test_list_fields_and_uncompressed(api: Any, worker: Any, pg_db: str) -> None:
    """`/backup/list` has the seed's fields; compress=false makes a .sql backup."""
    plain = await (await api.post("/backup/create?compress=false")).json()
    assert plain["filename"].endswith(".sql")
    body = await (await api.get("/backup/list")).json()
    assert body["total_count"] == 1
    entry = body["backups"][0]
    assert set(entry) >= {"filename", "size_bytes", "size_mb", "created_at", "compressed"}
    assert entry["compressed"] is False
    assert len(entry["created_at"]) == 19 and entry["created_at"][10] == "T"


async def test_delete_stats_roles_and_database_param(api: Any, anon: Any, worker: Any,
                                                     settings: Any, pg_db: str) -> None:
    """Delete needs admin; stats answers; ?database= picks the target; unknown is 404."""
    name = (await (await api.post("/backup/create")).json())["filename"]
    resp = await anon.delete(f"/backup/delete/{name}", headers=bearer(settings, "operator"))
    assert resp.status == 403
    resp = await anon.get("/backup/list", headers=bearer(settings, "viewer"))
    assert resp.status == 200
    resp = await api.delete(f"/backup/delete/{name}?database=main")
    assert await resp.json() == {"success": True,
                                 "message": f"Backup deleted successfully: {name}"}
    stats = await (await api.get("/backup/stats")).json()
    assert stats["engine"] == "postgresql" and "tables" in stats
    resp = await api.get("/backup/list?database=nope")
    assert resp.status == 404


async def test_timeout_answers_202_with_the_job(aiohttp_client: Any, settings: Any,
                                                redis: Any) -> None:
    """If the job outlives server.wait_timeout, the answer is 202 with the job's URL."""
    import time

    from shared.keys import Keys

    quick = replace(settings, server=replace(settings.server, wait_timeout=0.2))
    c = await aiohttp_client(create_app(quick), headers=bearer(quick, "operator"))
    # a worker that announced itself but takes nothing (busy elsewhere): the job stays queued
    await redis.zadd(Keys(settings.redis.prefix).workers, {"busy-worker": time.time()})
    resp = await c.post("/backup/create")
    body = await resp.json()
    assert resp.status == 202 and body["success"] is False
    assert body["job"] == f"/api/v1/jobs/{body['job_id']}" == resp.headers["Location"]


async def test_failed_restore_is_500_with_the_reason(api: Any, worker: Any, pg_db: str,
                                                     storage_dir: Path) -> None:
    """A failing restore is success=false with the job's error, never a false success."""
    await pg.load_rich(pg_db)
    name = (await (await api.post("/backup/create")).json())["filename"]
    flip_byte(storage_dir / name, 100)
    resp = await api.post(f"/backup/restore/{name}")
    body = await resp.json()
    assert resp.status == 500 and body["success"] is False
    assert body["error"]["code"] == "checksum_mismatch"


async def test_server_paths_are_for_admins_only(aiohttp_client: Any, settings: Any,
                                                redis: Any, worker: Any,
                                                storage_dir: Any) -> None:
    """Issue 20 weak spot: a failed /backup/create quoted the storage path (an OSError's
    text) to operators, and job errors showed it to viewers; admins still see it."""
    from api.app import create_app
    from tests.conftest import bearer

    storage_dir.parent.mkdir(parents=True, exist_ok=True)
    storage_dir.write_text("a file where the target's directory should be")
    op = await aiohttp_client(create_app(settings), headers=bearer(settings, "operator"))
    resp = await op.post("/backup/create")
    body = await resp.json()
    assert resp.status >= 400 and body["success"] is False, body
    assert str(storage_dir.parent) not in json.dumps(body), body
    assert "<server path>" in json.dumps(body)
    job_id = body["job"]["id"]
    admin = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    seen = await (await admin.get(f"/api/v1/jobs/{job_id}")).json()
    assert str(storage_dir.parent) in seen["error"]["message"]
    viewer = await aiohttp_client(create_app(settings), headers=bearer(settings, "viewer"))
    seen = await (await viewer.get(f"/api/v1/jobs/{job_id}")).json()
    assert str(storage_dir.parent) not in json.dumps(seen)
