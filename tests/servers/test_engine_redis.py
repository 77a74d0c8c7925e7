"""Redis engine against a private redis-server per test (never the shared one's data)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.config import Settings, parse_settings
from shared.formats.resp import RespReader, resp
from tests.conftest import make_raw_config
from tests.helpers import (
    flip_byte,
    form,
    publish_plain,
    read_events,
    restore,
    restore_twice_unchanged,
    stored_bytes,
    stored_manifest,
    wait_for,
    wait_for_terminal,
)
from tests.servers.conftest import REDIS_PW as PW
from tests.servers.conftest import start_redis as start_server

PW_ENV = "SAFEHOLD_TEST_REDIS_PASSWORD"


@pytest.fixture
def settings(prefix: str, tmp_path: Path, redis_port: int) -> Settings:
    """Override: target `main` is our private Redis (all logical databases)."""
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "redis", "password_env": PW_ENV,
                               "url": f"redis://127.0.0.1:{redis_port}"}}
    return parse_settings(raw, {PW_ENV: PW}, base=tmp_path, source="<test>")


BIG = 55 << 20


async def load(port: int, big: bool = False) -> None:
    r = Redis(port=port, password=PW)
    await r.set(b"bin\x00key", b"\x00\xff\x00binary\r\n")
    await r.set("ünïcode", "värde ✓")
    await r.rpush("list", *[f"item{i}" for i in range(300)])
    await r.sadd("set", *range(100))
    await r.zadd("zset", {f"m{i}": i / 3 for i in range(200)})
    await r.hset("hash", mapping={f"f{i}": f"v{i}" for i in range(150)})
    for i in range(50):
        await r.xadd("stream", {"n": i, "payload": "x" * i})
    await r.xgroup_create("stream", "workers", id="0")
    await r.xreadgroup("workers", "alice", {"stream": ">"}, count=10)
    await r.pfadd("hll", *[f"visitor{i}" for i in range(1000)])
    await r.set("ttl-key", "expires", ex=300)
    await r.hset("ttl-hash", "a", "b")
    await r.pexpire("ttl-hash", 120_000)
    if big:  # past STREAMED_KEY: their DUMPs are streamed on a connection of their own
        await r.set("big", b"0123456789abcdef" * (BIG // 16))
        await r.pexpire("big", 600_000)  # … with its expiry
    await r.execute_command("SELECT", 3)
    await r.aclose()
    r3 = Redis(port=port, password=PW, db=3)
    await r3.set("in-db-3", "yes")
    if big:  # … and in another database than 0, incompressible
        await r3.set("big-3", os.urandom(9 << 20))
    await r3.rpush("list3", "a", "b")
    await r3.aclose()


async def fingerprint(port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for db in range(16):
        r = Redis(port=port, password=PW, db=db)
        for key in sorted([k async for k in r.scan_iter(count=1000)]):
            kind = (await r.type(key)).decode()
            if kind == "string":
                value: Any = hashlib.sha256(await r.get(key)).hexdigest()
            elif kind == "list":
                value = await r.lrange(key, 0, -1)
            elif kind == "set":
                value = sorted(await r.smembers(key))
            elif kind == "zset":
                value = await r.zrange(key, 0, -1, withscores=True)
            elif kind == "hash":
                value = sorted((await r.hgetall(key)).items())
            elif kind == "stream":
                groups = [(g["name"], g["consumers"], g["pending"], g["last-delivered-id"])
                          for g in await r.xinfo_groups(key)]
                value = (await r.xrange(key), groups)
            else:
                value = kind
            pttl = await r.pttl(key)
            out[f"db{db}:{key!r}"] = (kind, repr(value), pttl > 0)
        await r.aclose()
    return out


async def ttls(port: int) -> dict[str, int]:
    r = Redis(port=port, password=PW)
    out = {k: await r.pttl(k) for k in ("ttl-key", "ttl-hash")}
    await r.aclose()
    return out


async def backup(api: Any, **body: Any) -> dict[str, Any]:
    job = await (await api.post("/api/v1/targets/main/backups?wait=120", json=body)).json()
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.slow  # (tests/slow holds whole modules of these)
async def test_round_trip_with_big_key_and_ttls(api: Any, worker: Any, redis_port: int,
                                                storage_dir: Path) -> None:
    """All types (binary strings, lists, sets, zsets, hashes, streams with groups, HLL),
    a > 50 MB key, TTLs (within a second) and several databases survive."""
    await load(redis_port, big=True)
    before, ttl_before = await fingerprint(redis_port), await ttls(redis_port)
    job = await backup(api)
    name = job["result"]["filename"]
    assert name.startswith("backup_redis_") and name.endswith(".resp.gz")
    manifest = await stored_manifest(storage_dir, name)
    assert manifest["databases"] == [0, 3] and manifest["server_version"].startswith("7")
    r = Redis(port=redis_port, password=PW)
    await r.flushall()
    await r.set("intruder", "x")
    await r.aclose()
    job = await (await api.post("/api/v1/targets/main/restores?wait=120",
                                json={"backup": name})).json()
    assert job["status"] == "succeeded", job
    assert await fingerprint(redis_port) == before
    ttl_after = await ttls(redis_port)
    for k, v in ttl_before.items():
        assert abs(ttl_after[k] - v) < 1500, (k, v, ttl_after[k])


async def test_expiries_are_read_per_database(api: Any, worker: Any, redis_port: int,
                                              storage_dir: Path) -> None:
    """The scan skips PTTL in a database where INFO says no key expires: db1 (none) next
    to db11 (one key expiring; its INFO line also starts with "db1") and db0 (an expiry in
    the year 9999): each database's keys come back with their own expiry, or none."""
    clients = {db: Redis(port=redis_port, password=PW, db=db) for db in (0, 1, 11)}
    try:
        await clients[1].mset({f"plain:{i}": i for i in range(2500)})
        await clients[11].mset({f"plain:{i}": i for i in range(2500)})
        await clients[11].set("soon", "x", px=400_000)
        await clients[0].set("far", "y")
        await clients[0].pexpireat("far", 253402300799000)  # 9999-12-31: 15 digits of ms
        name = (await backup(api))["result"]["filename"]
        assert (await stored_manifest(storage_dir, name))["databases"] == [0, 1, 11]
        await clients[0].flushall()
        job = await (await api.post("/api/v1/targets/main/restores?wait=120",
                                    json={"backup": name})).json()
        assert job["status"] == "succeeded", job
        assert 390_000 < await clients[11].pttl("soon") <= 400_000
        assert await clients[0].pexpiretime("far") == 253402300799000
        for db in (1, 11):
            assert await clients[db].dbsize() == 2500 + (db == 11)
            assert {await clients[db].pttl(f"plain:{i}") for i in range(0, 2500, 97)} == {-1}
    finally:
        for c in clients.values():
            await c.aclose()


async def test_a_stored_manifest_cannot_widen_what_a_restore_flushes(
        api: Any, worker: Any, redis_port: int, storage_dir: Path) -> None:
    """`also_clean` (the databases a rollback also empties) is the worker's own, in
    memory: written into a manifest beside a backup (anyone who can write the bucket), it
    is ignored — the restore flushes only the databases the checked file selects."""
    r0, r5 = Redis(port=redis_port, password=PW), Redis(port=redis_port, password=PW, db=5)
    try:
        await r0.set("in-db-0", "x")
        good = (await backup(api))["result"]["filename"]
        await r5.set("keep", "me")
        manifest = await stored_manifest(storage_dir, good)
        plain = gzip.decompress(await stored_bytes(storage_dir, good))
        edited = "backup_redis_20200101_000000.resp.gz"
        await publish_plain(storage_dir, edited, plain, {**manifest, "also_clean": [5]})
        job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                    json={"backup": edited})).json()
        assert job["status"] == "succeeded", job
        assert await r5.get("keep") == b"me" and await r0.get("in-db-0") == b"x"
    finally:
        await r0.aclose()
        await r5.aclose()


async def test_stock_redis_cli_pipe_restores_it(api: Any, worker: Any, redis_port: int,
                                                storage_dir: Path, tmp_path: Path) -> None:
    """`gunzip -c f | redis-cli --pipe` into an empty server reproduces the data."""
    await load(redis_port)
    before = await fingerprint(redis_port)
    path = storage_dir / (await backup(api))["result"]["filename"]
    proc2, port2 = await start_server(tmp_path / "redis-b")
    try:
        shell = await asyncio.create_subprocess_shell(
            f"gunzip -c '{path}' | redis-cli -p {port2} --pipe",
            env={**os.environ, "REDISCLI_AUTH": PW}, stdout=asyncio.subprocess.PIPE)
        out, _ = await shell.communicate()
        assert shell.returncode == 0 and b"errors: 0" in out, out
        assert await fingerprint(port2) == before
    finally:
        proc2.terminate()
        await proc2.wait()


async def test_keys_expiring_during_the_scan_are_skipped(api: Any, worker: Any,
                                                         redis_port: int) -> None:
    """Thousands of keys expiring mid-scan: the backup still succeeds, no error."""
    r = Redis(port=redis_port, password=PW)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(20_000):
            pipe.set(f"short:{i}", "x" * 50, px=1 + i % 40)
        await pipe.execute()
    await r.aclose()
    job = await backup(api)
    assert job["result"]["raw_bytes"] >= 0


async def test_failing_restore_rolls_back(api: Any, worker: Any, redis_port: int,
                                          storage_dir: Path) -> None:
    """A corrupt DUMP payload mid-restore fails the job and the safety backup is replayed."""
    await load(redis_port)
    good = (await backup(api))["result"]["filename"]
    r = Redis(port=redis_port, password=PW)
    await r.set("added-since", "1")
    await r.aclose()
    current = await fingerprint(redis_port)
    manifest = await stored_manifest(storage_dir, good)
    plain = gzip.decompress(await stored_bytes(storage_dir, good))
    bad_cmd = resp(b"RESTORE", b"broken", b"0", b"not a dump payload", b"REPLACE")
    bad = "backup_redis_20200101_000000.resp.gz"
    await publish_plain(storage_dir, bad, plain + bad_cmd, manifest)
    job = await (await api.post("/api/v1/targets/main/restores?wait=120",
                                json={"backup": bad})).json()
    assert job["status"] == "failed"
    assert job["error"]["database_state"] == "rolled_back", job["error"]
    assert await fingerprint(redis_port) == current


async def test_a_backup_changed_between_its_check_and_its_load_is_refused(
        api: Any, worker: Any, redis_port: int, storage_dir: Path) -> None:
    """A restore reads the file twice: checked whole, then loaded. A file put in its place
    in between (here while the safety backup waits on a paused server: the same stream
    loading into another database, still valid RESP) is refused at its first 4 MiB,
    before any of it is sent (not at the end, where the sha256 of the whole file would
    catch it after the fact): the job fails saying so, and the safety backup puts the
    data back."""
    await load(redis_port)
    r = Redis(port=redis_port, password=PW)
    await r.set("incompressible", os.urandom(6 << 20))  # the stream is over one window
    good = (await backup(api))["result"]["filename"]
    plain = gzip.decompress(await stored_bytes(storage_dir, good))
    first = resp(b"SELECT", b"0")
    assert plain.startswith(first)
    swap = gzip.compress(resp(b"SELECT", b"3") + plain[len(first):])
    await r.set("added-since", "1")
    current = await fingerprint(redis_port)
    await r.execute_command("CLIENT", "PAUSE", 4000, "ALL")
    await r.aclose()
    job_id = (await (await api.post("/api/v1/targets/main/restores",
                                    json={"backup": good})).json())["id"]

    async def in_safety_backup() -> bool:
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        return job["progress"].get("phase") in ("safety_backup", "dumping")
    await wait_for(in_safety_backup, 3, "the safety backup")
    (storage_dir / good).write_bytes(swap)
    job = await wait_for_terminal(api, job_id, timeout=60)
    assert job["status"] == "failed", job
    assert "changed since it was checked (window 0)" in job["error"]["message"], job
    assert job["error"]["database_state"] == "rolled_back", job["error"]
    assert await fingerprint(redis_port) == current


async def test_checksum_mismatch_and_progress(api: Any, worker: Any, redis_port: int,
                                              storage_dir: Path) -> None:
    """Tampered backups are refused untouched; keys are counted in the progress."""
    await load(redis_port)
    job = await backup(api)
    assert job["progress"]["item_kind"] == "keys" and job["progress"]["items_done"] >= 12
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    assert "dumping" in [e["data"]["phase"] for e in events if e["event"] == "phase"]
    path = storage_dir / job["result"]["filename"]
    flip_byte(path, 20)
    before = await fingerprint(redis_port)
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": job["result"]["filename"]})).json()
    assert job["error"]["code"] == "checksum_mismatch"
    assert await fingerprint(redis_port) == before
    stats = await (await api.get("/api/v1/targets/main/stats")).json()
    assert {d["db"] for d in stats["databases"]} == {0, 3}


async def test_rdb_format(api: Any, worker: Any, redis_port: int, storage_dir: Path) -> None:
    """format=rdb stores the server's RDB snapshot (.rdb.gz); the API won't restore it."""
    await load(redis_port)
    job = await backup(api, format="rdb")
    name = job["result"]["filename"]
    assert name.endswith(".rdb.gz")
    assert gzip.decompress(await stored_bytes(storage_dir, name)).startswith(b"REDIS")
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": name})).json()
    assert job["status"] == "failed" and "dump.rdb" in job["error"]["message"]
    assert job["error"]["database_state"] == "unchanged"
    resp_ = await api.post("/api/v1/targets/main/backups", json={"format": "xml"})
    assert resp_.status == 400


async def test_acl_user(aiohttp_client: Any, settings: Settings, redis_port: int,
                        redis: Any) -> None:
    """A target may name an ACL user in its URL (its password from the env): the worker
    backs up and restores as that user."""
    from dataclasses import replace

    from api.app import create_app
    from shared.config import Secret
    from tests.conftest import bearer
    from worker.main import build_worker, stop_gracefully

    admin = Redis(port=redis_port, password=PW)
    await admin.execute_command("ACL", "SETUSER", "backup", "on", ">backup-pw-7", "~*", "&*",
                                "+@all")
    await admin.set("k", "v")
    await admin.aclose()
    target = replace(settings.targets["main"], url=f"redis://backup@127.0.0.1:{redis_port}",
                     password=Secret("backup-pw-7"))
    s = replace(settings, targets={"main": target})
    c = await aiohttp_client(create_app(s), headers=bearer(s, "admin"))
    w = build_worker(s, poll_delay=0.05)
    task = asyncio.create_task(w.main())
    try:
        job = await backup(c)
        admin = Redis(port=redis_port, password=PW)
        await admin.set("k", "changed")
        await admin.aclose()
        job = await (await c.post("/api/v1/targets/main/restores?wait=60",
                                  json={"backup": job["result"]["filename"]})).json()
        assert job["status"] == "succeeded", job
        check = Redis(port=redis_port, username="backup", password="backup-pw-7")
        assert await check.get("k") == b"v"
        await check.aclose()
    finally:
        await stop_gracefully(w, 10, task)


async def test_restore_twice_over_the_live_database(api: Any, worker: Any,
                                                    redis_port: int) -> None:
    """Every type (strings, lists, sets, zsets, hashes, streams with groups, HLL, TTLs,
    two logical databases): restoring over the untouched data, twice, changes nothing."""
    await load(redis_port)
    before = await fingerprint(redis_port)
    name = (await backup(api))["result"]["filename"]
    await restore_twice_unchanged(api, name, lambda: fingerprint(redis_port), before)


@pytest.mark.parametrize("command", [
    [b"CONFIG", b"SET", b"dir", b"/tmp"],
    [b"FLUSHALL"],
    [b"MODULE", b"LOAD", b"/tmp/evil.so"],
    [b"EVAL", b"return 1", b"0"],
    [b"SLAVEOF", b"127.0.0.1", b"1"],
    [b"SET", b"plain", b"value"],
    [b"RESTORE", b"k", b"0", b"payload"],  # without REPLACE: not what Safehold writes
])
async def test_commands_outside_the_backup_shape_are_refused_before_any_flush(
        api: Any, worker: Any, redis_port: int, storage_dir: Path,
        command: list[bytes]) -> None:
    await load(redis_port)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    plain = gzip.decompress(await stored_bytes(storage_dir, good))
    hostile = plain + resp(*command)
    resp_ = await api.post("/api/v1/targets/main/uploads", data=form(gzip.compress(hostile)))
    body = await resp_.json()
    assert resp_.status == 400 and body["error"]["code"] == "unsafe_backup", body
    assert command[0].decode() in body["error"]["message"]
    r = Redis(port=redis_port, password=PW)
    await r.set("added-since", "1")
    dir_before = await r.config_get("dir")
    await r.aclose()
    current = await fingerprint(redis_port)
    bad = "upload_redis_20200101_000000.resp.gz"
    await publish_plain(storage_dir, bad, hostile, manifest)
    job = await restore(api, bad)
    assert job["status"] == "failed" and job["error"]["code"] == "unsafe_backup", job
    assert job["error"]["database_state"] == "unchanged"
    assert await fingerprint(redis_port) == current  # nothing was flushed
    r = Redis(port=redis_port, password=PW)
    assert await r.config_get("dir") == dir_before
    await r.aclose()


async def test_a_backup_for_other_databases_never_touches_them(
        aiohttp_client: Any, redis: Any, redis_port: int, storage_dir: Path, prefix: str,
        tmp_path: Path) -> None:
    """A target scoped to db 5: a file that SELECTs db 3 is refused at upload and before
    any flush (the operator picked another target's file, or an attacker crafted it)."""
    from api.app import create_app
    from tests.conftest import bearer

    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "redis", "password_env": PW_ENV,
                               "url": f"redis://127.0.0.1:{redis_port}/5"}}
    scoped = parse_settings(raw, {PW_ENV: PW}, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(scoped), headers=bearer(scoped, "admin"))
    r3 = Redis(port=redis_port, password=PW, db=3)
    await r3.set("other-target", "keep me")
    await r3.aclose()
    r5 = Redis(port=redis_port, password=PW, db=5)
    await r5.set("mine", "1")
    await r5.aclose()
    hostile = resp(b"SELECT", b"3") + resp(b"RESTORE", b"k", b"0", b"x", b"REPLACE")
    resp_ = await api.post("/api/v1/targets/main/uploads", data=form(gzip.compress(hostile)))
    body = await resp_.json()
    assert resp_.status == 400 and "outside this target" in body["error"]["message"], body
    before = await fingerprint(redis_port)
    bad = "upload_redis_20200101_000000.resp.gz"
    await publish_plain(storage_dir, bad, hostile, {"engine": "redis", "kind": "upload",
                                                    "format": "resp", "databases": [5]})
    from worker.main import build_worker, stop_gracefully

    w = build_worker(scoped, poll_delay=0.05)  # a worker that knows the target's scope
    task = asyncio.create_task(w.main())
    try:
        job = await restore(api, bad)
    finally:
        await stop_gracefully(w, 10, task)
    assert job["status"] == "failed" and job["error"]["database_state"] == "unchanged", job
    assert "outside this target" in job["error"]["message"]
    assert await fingerprint(redis_port) == before


async def test_a_rollback_also_empties_databases_the_safety_backup_does_not_hold(
        api: Any, worker: Any, redis_port: int, storage_dir: Path) -> None:
    """The failed restore wrote into db 7, which was empty (so the safety backup has no
    db 7): the rollback flushes it too, and the data is exactly as before."""
    await load(redis_port)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    r = Redis(port=redis_port, password=PW)
    payload = await r.dump("ünïcode")
    await r.aclose()
    before = await fingerprint(redis_port)
    sql = (resp(b"SELECT", b"7") + resp(b"RESTORE", b"written-then-failed", b"0", payload,
                                        b"REPLACE")
           + resp(b"RESTORE", b"broken", b"0", b"not a dump payload", b"REPLACE"))
    bad = "upload_redis_20200101_000000.resp.gz"
    await publish_plain(storage_dir, bad, sql, manifest)
    job = await restore(api, bad)
    assert job["status"] == "failed" and job["error"]["database_state"] == "rolled_back", job
    assert await fingerprint(redis_port) == before


async def test_restore_drill_into_a_throwaway_server(api: Any, worker: Any, redis_port: int
                                                     ) -> None:
    """A drill replays the backup into a private redis-server and compares keys per
    database with the dump's; the live server is untouched."""
    await load(redis_port)
    before = await fingerprint(redis_port)
    r = Redis(port=redis_port, password=PW)
    await r.set("session:short", b"x", px=400)  # expires between the dump and the drill
    await r.aclose()
    await backup(api)
    await asyncio.sleep(0.6)
    job = await (await api.post("/api/v1/targets/main/verify?wait=120", json={})).json()
    assert job["status"] == "succeeded", job.get("error")
    result = job["result"]
    assert result["mode"] == "scratch-restore" and result["counts_compared"] == 2
    assert result["mismatches"] is None and result["rows_restored"] > 0
    assert await fingerprint(redis_port) == before


async def test_a_dump_whose_connection_is_killed_fails_and_keeps_nothing(
        api: Any, worker: Any, redis_port: int, storage_dir: Path) -> None:
    """`CLIENT KILL` of the dump's connection mid-scan (as a failover or an admin does):
    the job fails with the cause, nothing is listed, no temporary file stays; the next
    backup works."""
    r = Redis(port=redis_port, password=PW)
    for start in range(0, 400_000, 20_000):
        await r.mset({f"k:{i}": f"value-{i}" for i in range(start, start + 20_000)})
    resp = await api.post("/api/v1/targets/main/backups")
    job_id = (await resp.json())["id"]
    for _ in range(400):  # until the dump has read some keys
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        if (job["progress"] or {}).get("items_done") or job["status"] != "queued" and \
                job["status"] != "running":
            break
        await asyncio.sleep(0.02)
    assert job["status"] == "running", job
    # the scan rides out a few lost connections (the next test); killed again and again,
    # as a flapping proxy would, it gives up. Kill until the job ends.
    killed = 0
    for _ in range(1000):
        killed += int(await r.execute_command("CLIENT", "KILL", "TYPE", "normal",
                                              "SKIPME", "yes"))
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        if job["status"] not in ("queued", "running"):
            break
        await asyncio.sleep(0.02)
    assert killed >= 1
    assert job["status"] == "failed", job
    assert job["progress"]["items_done"] < 400_000  # killed mid-scan, not after
    assert job["error"]["code"] in ("dump_failed", "database_unreachable"), job["error"]
    assert "connection" in job["error"]["message"].lower(), job["error"]
    listed = await (await api.get("/api/v1/targets/main/backups")).json()
    assert listed["backups"] == []
    assert not storage_dir.exists() or list(storage_dir.iterdir()) == []  # no temp file
    await r.aclose()
    assert (await backup(api))["result"]["size_bytes"] > 0


async def backup_mid_scan(api: Any, r: Redis, keys: int) -> str:
    """Fill db0 with `keys` small keys, start a backup, return its job id once its scan
    has read some."""
    for start in range(0, keys, 25_000):
        await r.mset({f"k:{i}": i for i in range(start, min(keys, start + 25_000))})
    job_id: str = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]

    async def scanning() -> dict[str, Any] | None:
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        return job if (job["progress"] or {}).get("items_done") else None
    await wait_for(scanning, 30, "the scan")
    return job_id


async def test_a_scan_rides_out_a_lost_connection(api: Any, worker: Any, redis_port: int,
                                                  storage_dir: Path) -> None:
    """One `CLIENT KILL` of the scan's connection mid-dump: the step in flight is sent
    again on a new connection; the backup succeeds with every key exactly once, and says
    what happened in its warnings."""
    r = Redis(port=redis_port, password=PW)
    total = 1_000_000
    job_id = await backup_mid_scan(api, r, total)
    killed = int(await r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
    running = (await (await api.get(f"/api/v1/jobs/{job_id}")).json())["status"]
    job = await wait_for_terminal(api, job_id, timeout=120)
    await r.aclose()
    assert killed == 1 and running == "running", (killed, running)
    assert job["status"] == "succeeded", job
    assert any("resumed the scan where it was" in w for w in job["result"]["warnings"])
    name = job["result"]["filename"]
    assert (await stored_manifest(storage_dir, name))["counts"] == {"db0": total}
    reader, restored = RespReader(keep=64), []
    plain = gzip.decompress(await stored_bytes(storage_dir, name))
    for i in range(0, len(plain), 1 << 20):
        restored += [cmd[1] for cmd in reader.feed(plain[i:i + (1 << 20)])
                     if cmd[0] == b"RESTORE"]
    assert len(restored) == len(set(restored)) == total  # each key once


async def test_a_scan_never_resumes_on_another_server_process(
        api: Any, worker: Any, redis_port: int, tmp_path: Path) -> None:
    """Redis restarted mid-scan (its data saved and loaded back: same keys, a new process):
    a SCAN cursor means nothing to another process (its hash seed differs: keys would be
    missed and doubled), so the scan does not resume there; the backup fails and says
    why, nothing is listed."""
    r = Redis(port=redis_port, password=PW)
    total = 1_000_000
    job_id = await backup_mid_scan(api, r, total)
    with contextlib.suppress(Exception):
        await r.execute_command("SHUTDOWN", "SAVE")
    await r.aclose()
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmp_path / "redis-a"), "--requirepass", PW,
        stdout=asyncio.subprocess.DEVNULL)
    try:
        job = await wait_for_terminal(api, job_id, timeout=60)
        assert job["status"] == "failed", job
        assert "another Redis server process answers" in job["error"]["message"], job
        listed = await (await api.get("/api/v1/targets/main/backups")).json()
        assert listed["backups"] == []
    finally:
        proc.terminate()
        await proc.wait()


async def test_some_keys_restored_the_rest_left_as_it_is(
        api: Any, worker: Any, redis_port: int) -> None:
    """Issue 25 `keys` on Redis: the keys a pattern matches are the backup's again — the
    changed one restored, the deleted one back, one made since removed — in every database
    of the backup; every other key is exactly as it is now; twice; bad patterns and other
    engines' options refused before any job."""
    r = Redis(port=redis_port, password=PW)
    for i in range(20):
        await r.set(f"session:{i}", f"s{i}")
        await r.set(f"user:{i}", f"u{i}")
    r2 = Redis(port=redis_port, password=PW, db=2)
    await r2.set("session:db2", "x")
    name = (await backup(api))["result"]["filename"]
    await r2.set("session:db2", "changed")
    await r.set("session:1", "changed")
    await r.delete("session:2")
    await r.set("session:new", "since")
    await r.set("user:1", "changed too")
    await r.set("user:new", "made since")
    for _ in range(2):
        job = await (await api.post("/api/v1/targets/main/restores?wait=120", json={
            "backup": name, "keys": ["session:*"]})).json()
        assert job["status"] == "succeeded", job.get("error")
        assert await r.get("session:1") == b"s1" and await r.get("session:2") == b"s2"
        assert await r.get("session:new") is None
        assert await r.get("user:1") == b"changed too" and await r.get("user:new") == b"made since"
        assert len(await r.keys("session:*")) == 20 and len(await r.keys("user:*")) == 21
    assert await r2.get("session:db2") == b"x"  # every database of the backup
    await r.aclose()
    await r2.aclose()
    for keys, status in [(["a\x00b"], 400), ([], 400), ("session:*", 400), (["x" * 600], 400)]:
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "keys": keys})
        assert resp.status == status, (keys, await resp.text())
    resp = await api.post("/api/v1/targets/main/restores",
                          json={"backup": name, "tables": ["t"]})
    assert resp.status == 422
