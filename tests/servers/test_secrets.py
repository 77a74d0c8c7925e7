"""Secrets never leak: not in argv (see test_failures_pg), job records, events, manifests,
audit entries, API answers or logs."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from tests import pg
from tests.helpers import backup, publish_plain, stored_bytes, stored_manifest

PW = pg.TEST_PASSWORD


async def everything_in_redis(redis: Redis, prefix: str) -> str:
    out = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=500):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            out.append(repr(await redis.hgetall(key)))
        elif kind == "stream":
            out.append(repr(await redis.xrange(key)))
        elif kind == "string":
            out.append(repr(await redis.get(key)))
        elif kind == "zset":
            out.append(repr(await redis.zrange(key, 0, -1)))
        elif kind == "set":
            out.append(repr(await redis.smembers(key)))
    return "\n".join(out)


async def test_no_secret_anywhere_after_success_and_failures(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, redis: Redis, prefix: str,
        caplog: Any) -> None:
    """After backups, restores and failures (one whose SQL error quotes the password), the
    password is in no Redis record, event, manifest, API answer or log line."""
    caplog.set_level(logging.DEBUG)
    await pg.load_rich(pg_db)
    answers = []
    job = await backup(api)
    answers.append(job)
    name = job["result"]["filename"]
    resp = await api.post("/api/v1/targets/main/restores?wait=60", json={"backup": name})
    answers.append(await resp.json())
    # a restore whose SQL error message would quote the password
    manifest = await stored_manifest(storage_dir, name)
    sql = gzip.decompress(await stored_bytes(storage_dir, name))
    bad = "backup_postgresql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, sql + f'SELECT * FROM "{PW}";\n'.encode(), manifest)
    resp = await api.post("/api/v1/targets/main/restores?wait=60", json={"backup": bad})
    failed = await resp.json()
    answers.append(failed)
    assert failed["status"] == "failed"
    assert "***" in failed["error"]["message"]  # the quoted password was redacted
    answers.append(await (await api.get("/api/v1/targets/main/stats")).json())
    answers.append(await (await api.get("/api/v1/audit")).json())
    answers.append(await (await api.get("/api/v1/jobs")).json())
    answers.append(await (await api.get("/api/v1/targets")).json())
    await pg.drop_database(pg_db)  # and a failure to connect
    answers.append(await (await api.post("/api/v1/targets/main/backups?wait=30")).json())
    assert answers[-1]["error"]["code"] == "target_unreachable"

    assert PW not in json.dumps(answers)
    assert PW not in await everything_in_redis(redis, prefix)
    for manifest_file in storage_dir.glob("*.json"):
        if manifest_file.name.startswith(bad):
            continue  # written by this test, not by Safehold
        assert PW not in manifest_file.read_text(), manifest_file.name
    assert PW not in caplog.text
