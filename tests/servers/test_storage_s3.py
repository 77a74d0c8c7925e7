"""Destinations: one backup fanned out to a local directory and an S3 bucket (a real
SeaweedFS server), read back, restored from whichever copy is healthy, listed from the
bucket alone by a fresh server, and never leaving an unfinished multipart upload."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from api.app import create_app
from shared import naming
from shared.config import Settings, parse_settings
from shared.storage import s3 as s3storage
from shared.storage.catalog import Catalog
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import (
    backup,
    read_events,
    restore,
    running_worker,
    start_backup_until_pg_dump,
    stored_bytes,
    table_lock,
    wait_for,
    wait_for_terminal,
)

MiB = 1 << 20


def s3_raw(prefix: str, tmp_path: Path, pg_db: str, server: Any, bucket: str,
           **offsite: Any) -> dict[str, Any]:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["storage"]["offsite"] = {"type": "s3", "endpoint": server.endpoint, "bucket": bucket,
                                 "prefix": "safehold", **offsite}
    raw["targets"]["main"]["destinations"] = ["local", "offsite"]
    return raw


def dead_s3(server: Any) -> Any:
    """The same credentials, an endpoint where nothing listens (a destination that is down)."""
    from tests.s3server import free_port

    return type("Dead", (), {"endpoint": f"http://127.0.0.1:{free_port()}",
                             "access_key": server.access_key,
                             "secret_key": server.secret_key})()


def s3_env(test_env: dict[str, str], server: Any) -> dict[str, str]:
    return {**test_env, "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key}


@pytest.fixture
def settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str],
             s3_server: Any, bucket: str) -> Settings:
    return parse_settings(s3_raw(prefix, tmp_path, pg_db, s3_server, bucket),
                          s3_env(test_env, s3_server), base=tmp_path, source="<test>")


@pytest.fixture
async def s3(s3_server: Any) -> AsyncIterator[Any]:
    """A plain S3 client to look at the bucket as an operator would."""
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", **s3_server.client_kwargs()) as client:
        yield client


async def objects(s3: Any, bucket: str) -> dict[str, int]:
    out = await s3.list_objects_v2(Bucket=bucket)
    return {o["Key"]: o["Size"] for o in out.get("Contents", [])}


async def unfinished(s3: Any, bucket: str) -> list[str]:
    out = await s3.list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in out.get("Uploads", []) or []]


async def load_bulk(db: str, rows: int) -> None:
    """~33 bytes of hex per row: barely compressible text, so parts fill up."""
    conn = await pg.user_conn(db)
    await conn.execute(f"CREATE TABLE bulk AS SELECT g AS id, md5(random()::text) AS h "
                       f"FROM generate_series(1, {rows}) g")
    await conn.close()


# ---------------------------------------------------------------------------- unit


# ---------------------------------------------------------------------------- fan-out
async def test_backup_fans_out_in_parts_and_reads_back(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, s3: Any, bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One dump lands on both destinations at once, the S3 copy in several parts; each copy
    is read back (local sha256, S3 size + multipart ETag) and the manifest says so."""
    monkeypatch.setattr(s3storage, "FIRST_PART", 5 * MiB)  # S3's minimum: several parts
    await load_bulk(pg_db, 500_000)
    job = await backup(api, compress=False)
    result = job["result"]
    name = result["filename"]
    assert result["stored_on"] == ["local", "offsite"] and result["partial"] is False
    assert result["destinations"]["offsite"]["parts"] >= 3
    assert result["destinations"]["offsite"]["check"] == "size+etag"
    assert result["destinations"]["local"]["check"] == "sha256"
    keys = await objects(s3, bucket)
    key = f"safehold/main/{name}"
    assert keys[key] == result["size_bytes"] == (storage_dir / name).stat().st_size
    body = await (await s3.get_object(Bucket=bucket, Key=key))["Body"].read()
    assert hashlib.sha256(body).hexdigest() == result["sha256"]
    manifest = json.loads(await (await s3.get_object(Bucket=bucket, Key=f"{key}.json"))
                          ["Body"].read())
    assert manifest["destinations"]["offsite"]["status"] == "stored"
    assert "secret" not in json.dumps(manifest).lower()
    assert await unfinished(s3, bucket) == []
    listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
    assert [(b["filename"], b["stored_on"]) for b in listed] == [(name, ["local", "offsite"])]


async def test_partial_fan_out_succeeds_loudly(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], s3_server: Any) -> None:
    """A destination that is down does not stop the other: the job succeeds `partial`, with
    a warning event and an audit entry, and the manifest records the failure."""
    raw = s3_raw(prefix, tmp_path, pg_db, dead_s3(s3_server), "backups")
    settings = parse_settings(raw, s3_env(test_env, s3_server), base=tmp_path, source="<t>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        job = await backup(api)
    result = job["result"]
    assert result["partial"] is True and result["stored_on"] == ["local"], result
    assert result["destinations"]["offsite"]["status"] == "failed"
    assert "Could not connect" in result["destinations"]["offsite"]["error"]["message"]
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"),
                               until=lambda e: e["event"] == "status"
                               and e["data"].get("status") == "succeeded")
    warnings = [e for e in events if e["event"] == "log"
                and e["data"].get("level") == "warning"]
    assert any("offsite failed" in e["data"]["message"] for e in warnings)
    audit = (await (await api.get("/api/v1/audit?action=backup.partial")).json())["entries"]
    assert audit and audit[0]["backup"] == result["filename"]
    manifest = (await (await api.get(
        f"/api/v1/targets/main/backups/{result['filename']}")).json())
    assert manifest["partial"] is True and manifest["stored_on"] == ["local"]
    # issue 20.6: the listing names the destination that did not answer, metrics say it
    listing = await (await api.get("/api/v1/targets/main/backups")).json()
    assert [b["filename"] for b in listing["backups"]] == [result["filename"]]
    assert listing["unavailable"] == ["offsite"]
    seed = await (await api.get("/backup/list")).json()
    assert seed["unavailable"] == ["offsite"], seed
    metrics = await (await api.get("/metrics")).text()
    assert 'safehold_destination_up{destination="offsite",target="main"} 0.0' in metrics
    assert 'safehold_destination_up{destination="local",target="main"} 1.0' in metrics


async def test_no_destination_at_all_fails(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], s3_server: Any) -> None:
    """Stored nowhere is a failed job; a listing with no destination answering is 503
    `storage_unavailable`, never an empty 200 (issue 20.6), and metrics count no backups."""
    raw = s3_raw(prefix, tmp_path, pg_db, dead_s3(s3_server), "backups")
    raw["targets"]["main"]["destinations"] = ["offsite"]
    settings = parse_settings(raw, s3_env(test_env, s3_server), base=tmp_path, source="<t>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        resp = await api.post("/api/v1/targets/main/backups?wait=60", json={})
        job = await resp.json()
    assert job["status"] == "failed", job
    assert "Could not connect" in job["error"]["message"]
    resp = await api.get("/api/v1/targets/main/backups")
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["error"]["code"] == "storage_unavailable"
    resp = await api.get("/backup/list")
    assert resp.status == 503 and "storage_unavailable" in await resp.text()
    metrics = await (await api.get("/metrics")).text()
    assert 'safehold_destination_up{destination="offsite",target="main"} 0.0' in metrics
    assert 'safehold_backups{target="main"' not in metrics  # unknown, not a false 0


# ---------------------------------------------------------------------------- aborts
async def test_cancelled_backup_leaves_no_multipart_upload(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, s3: Any, bucket: str) -> None:
    """A backup cancelled mid-dump aborts its multipart upload and its temp file."""
    await pg.load_rich(pg_db)
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        job_id, _ = await start_backup_until_pg_dump(api, pg_db)
        await wait_for(lambda: unfinished(s3, bucket), 10, "the multipart upload to start")
        assert (await (await api.delete(f"/api/v1/jobs/{job_id}")).json())["status"] in (
            "running", "cancelled")
        job = await wait_for_terminal(api, job_id)
    assert job["status"] == "cancelled"
    assert await unfinished(s3, bucket) == []
    assert await objects(s3, bucket) == {}
    assert [p for p in storage_dir.iterdir()] == []


async def test_failed_stream_aborts_and_reaper_aborts_dead_workers_uploads(
        settings: Settings, s3: Any, bucket: str, redis: Redis) -> None:
    """A stream that breaks mid-way aborts every destination; an upload whose worker died
    (only its job record's handle is left) is aborted by the reaper."""
    catalog = Catalog(settings)
    target = settings.target("main")
    name = naming.new_name("backup", "postgresql", datetime.now(UTC))
    fan = await catalog.begin(target, name, "job-x")
    await fan.write(os.urandom(9 * MiB))
    await wait_for(lambda: unfinished(s3, bucket), 10, "the upload")
    await fan.abort()  # what backup() does when the dump fails
    assert await unfinished(s3, bucket) == [] and await objects(s3, bucket) == {}

    from shared.audit import AuditLog
    from shared.jobs import JobStore
    from shared.keys import Keys
    from shared.outcomes import Outcomes
    from shared.reaper import reap_orphans

    store = JobStore(redis, Keys(settings.redis.prefix), ttl=60)
    orphan = await catalog.begin(target, name, "job-y")
    await orphan.write(os.urandom(9 * MiB))
    await wait_for(lambda: unfinished(s3, bucket), 10, "the upload")
    job, _ = await store.create("backup", "main", {}, {"subject": "t"})
    await store.transition(job.id, ["queued"], "running",
                           fields={"started_at": "2000-01-01T00:00:00Z",
                                   "temp_handles": " ".join(orphan.handles)})
    for task in orphan._tasks.values():  # the worker "dies": nothing of it runs on
        task.cancel()
    outcomes = Outcomes(settings, redis, store, AuditLog(redis, store.keys))
    assert await reap_orphans(outcomes, catalog, orphan_after=1) == [job.id]
    assert await unfinished(s3, bucket) == []
    assert not any(Path(settings.storage.path).glob("main/.tmp-*"))
    await catalog.close()


# ---------------------------------------------------------------------------- reading
async def test_restore_uses_the_second_copy_when_the_first_is_lost(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """The local file is gone (or damaged): the restore reads the S3 copy and says so."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    name = (await backup(api))["result"]["filename"]
    other = (await backup(api))["result"]["filename"]
    (storage_dir / name).unlink()
    blob = bytearray(await stored_bytes(storage_dir, other))
    blob[len(blob) // 2] ^= 0xFF
    (storage_dir / other).write_bytes(bytes(blob))
    conn = await pg.user_conn(pg_db)
    await conn.execute("DROP TABLE events CASCADE")
    await conn.close()
    job = await restore(api, name, create_safety_backup=False)
    assert job["status"] == "succeeded", job
    assert job["result"]["restored_from"] == "offsite"
    assert await pg.fingerprint(pg_db) == before
    job = await restore(api, other, create_safety_backup=False)  # damaged locally
    assert job["status"] == "succeeded", job
    assert job["result"]["restored_from"] == "offsite"
    assert any("unusable" in w for w in job["result"]["warnings"] or [])


async def test_ranged_download_from_s3_and_redirect(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], s3_server: Any, bucket: str) -> None:
    """With the bucket read first, downloads stream from S3 with Range; with
    `download = "redirect"` they redirect to a presigned URL that serves the same bytes."""
    import aiohttp

    env = s3_env(test_env, s3_server)
    raw = s3_raw(prefix, tmp_path, pg_db, s3_server, bucket)
    raw["storage"]["read_order"] = "offsite"
    settings = parse_settings(raw, env, base=tmp_path, source="<t>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        result = (await backup(api))["result"]
    name = result["filename"]
    local = (tmp_path / "backups" / "main" / name).read_bytes()
    url = f"/api/v1/targets/main/backups/{name}/download"
    resp = await api.get(url, headers={"Range": "bytes=100-1123"})
    assert resp.status == 206 and resp.headers["X-Safehold-Destination"] == "offsite"
    assert await resp.read() == local[100:1124]
    resp = await api.get(url)
    assert await resp.read() == local and resp.headers["ETag"] == f'"{result["sha256"]}"'

    raw["storage"]["offsite"]["download"] = "redirect"
    settings2 = parse_settings(raw, env, base=tmp_path, source="<t>")
    api2 = await aiohttp_client(create_app(settings2), headers=bearer(settings2, "admin"))
    resp = await api2.get(url, allow_redirects=False)
    assert resp.status == 307
    import yarl

    location = yarl.URL(resp.headers["Location"], encoded=True)  # as a browser follows it
    async with aiohttp.ClientSession() as plain, plain.get(location) as got:
        assert got.status == 200 and await got.read() == local


async def test_a_fresh_server_lists_a_bucket_from_its_manifests(
        api: Any, worker: Any, pg_db: str, aiohttp_client: Any, prefix: str,
        tmp_path: Path, test_env: dict[str, str], s3_server: Any, bucket: str) -> None:
    """A new server (empty local disk) pointed at the bucket lists and restores it all."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    names = [(await backup(api))["result"]["filename"] for _ in range(2)]
    fresh_dir = tmp_path / "elsewhere"
    raw = s3_raw(prefix + "x", fresh_dir, pg_db, s3_server, bucket)
    settings = parse_settings(raw, s3_env(test_env, s3_server), base=fresh_dir,
                              source="<t>")
    api2 = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    listed = (await (await api2.get("/api/v1/targets/main/backups")).json())["backups"]
    assert sorted(b["filename"] for b in listed) == sorted(names)
    assert all(b["stored_on"] == ["offsite"] for b in listed)
    conn = await pg.user_conn(pg_db)
    await conn.execute("DELETE FROM everything")
    await conn.close()
    async with running_worker(settings):
        job = await restore(api2, names[0], create_safety_backup=False)
    assert job["status"] == "succeeded", job
    assert await pg.fingerprint(pg_db) == before


async def test_destinations_health_and_delete_everywhere(
        api: Any, worker: Any, pg_db: str, anon: Any, settings: Settings, s3: Any,
        bucket: str) -> None:
    """`GET /destinations` (admin only) reports each destination; deleting a backup removes
    every copy."""
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    resp = await anon.get("/api/v1/destinations", headers=bearer(settings, "operator"))
    assert resp.status == 403
    dests = {d["name"]: d for d in
             (await (await api.get("/api/v1/destinations")).json())["destinations"]}
    assert dests["offsite"]["reachable"] and dests["offsite"]["writable"]
    assert dests["offsite"]["backups"] == 1 and dests["offsite"]["targets"] == ["main"]
    assert dests["local"]["free_bytes"] > 0 and dests["local"]["backups"] == 1
    assert "secret" not in json.dumps(dests).lower()
    resp = await api.delete(f"/api/v1/targets/main/backups/{name}")
    assert resp.status == 200
    assert await objects(s3, bucket) == {}
    assert (await (await api.get("/api/v1/targets/main/backups")).json())["backups"] == []


async def test_object_lock_keeps_recent_backups_from_a_stolen_key(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], s3_server: Any, s3: Any) -> None:
    """With `object_lock_mode`, every object carries a retention date: deleting a locked
    version is refused by the server, so even an admin key cannot destroy a recent backup
    (Safehold's own delete only hides it behind a delete marker)."""
    from tests import s3server

    locked = f"l-{os.urandom(5).hex()}"
    await s3server.make_bucket(s3_server, locked, object_lock=True)
    raw = s3_raw(prefix, tmp_path, pg_db, s3_server, locked, object_lock_mode="GOVERNANCE",
                 object_lock_days=1)
    raw["targets"]["main"]["destinations"] = ["offsite"]
    settings = parse_settings(raw, s3_env(test_env, s3_server), base=tmp_path, source="<t>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        name = (await backup(api))["result"]["filename"]
    key = f"safehold/main/{name}"
    for k in (key, f"{key}.json"):
        retention = (await s3.get_object_retention(Bucket=locked, Key=k))["Retention"]
        assert retention["Mode"] == "GOVERNANCE"
    head = await s3.head_object(Bucket=locked, Key=key)
    with pytest.raises(Exception, match="AccessDenied"):
        await s3.delete_object(Bucket=locked, Key=key, VersionId=head["VersionId"])
    resp = await api.delete(f"/api/v1/targets/main/backups/{name}")
    assert resp.status == 200
    versions = await s3.list_object_versions(Bucket=locked)
    assert key in [v["Key"] for v in versions.get("Versions", [])]  # still recoverable
