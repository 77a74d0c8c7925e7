"""A Redis restore beside the live database (issue 25, `into_database`): the backup's one
database index loaded into another index of the same server — every key, value and
expiry — the live index untouched; an index holding keys refused unless `replace` (then its
safety backup first, rolled back on failure); a failure into an empty index empties it
again; hostile indexes, the target's own and another target's refused before any job."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.config import Settings, parse_settings
from shared.formats.resp import resp
from tests.conftest import make_raw_config
from tests.helpers import publish_plain, restore, stored_bytes, stored_manifest
from tests.servers.test_engine_redis import PW, PW_ENV, backup, fingerprint, load


@pytest.fixture
def settings(prefix: str, tmp_path: Path, redis_port: int) -> Settings:
    """Target `main` is database 0 of our private Redis; `other` is its database 5."""
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    url = f"redis://127.0.0.1:{redis_port}"
    raw["targets"] = {"main": {"engine": "redis", "password_env": PW_ENV, "url": f"{url}/0"},
                      "other": {"engine": "redis", "password_env": PW_ENV,
                                "url": f"{url}/5"}}
    return parse_settings(raw, {PW_ENV: PW}, base=tmp_path, source="<test>")


def one_db(prints: dict[str, Any], db: int, as_db: int = 0) -> dict[str, Any]:
    """The fingerprint of database `db`, its keys named as if in `as_db`."""
    return {k.replace(f"db{db}:", f"db{as_db}:", 1): v for k, v in prints.items()
            if k.startswith(f"db{db}:")}


async def test_a_restore_beside_into_another_database_index(
        api: Any, worker: Any, redis_port: int) -> None:
    await load(redis_port)  # db 0 and db 3
    name = (await backup(api))["result"]["filename"]
    backed_up = one_db(await fingerprint(redis_port), 0)
    r = Redis(port=redis_port, password=PW)
    await r.delete("list", "hash")
    await r.set("made-since", "1")
    live = await fingerprint(redis_port)
    job = await restore(api, name, into_database="7")
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["safety_backup"] is None
    now = await fingerprint(redis_port)
    assert one_db(now, 7) == backed_up
    assert {k: v for k, v in now.items() if not k.startswith("db7:")} == live
    assert 0 < await Redis(port=redis_port, password=PW, db=7).pttl("ttl-key")

    job = await restore(api, name, into_database="7")  # it holds keys now
    assert job["status"] == "failed" and job["error"]["code"] == "database_exists", job
    assert await fingerprint(redis_port) == now

    r7 = Redis(port=redis_port, password=PW, db=7)
    await r7.set("stray", "x")
    await r7.delete("set")
    for _ in range(2):  # replace: over it like a live database, its safety backup first
        job = await restore(api, name, into_database="7", replace=True)
        assert job["status"] == "succeeded", job.get("error")
        assert job["result"]["safety_backup"], job["result"]
        assert await fingerprint(redis_port) == now
    await r.aclose()
    await r7.aclose()


async def test_hostile_and_taken_indexes_are_refused(api: Any, worker: Any,
                                                     redis_port: int) -> None:
    await load(redis_port)
    name = (await backup(api))["result"]["filename"]
    before = await fingerprint(redis_port)
    for into, status in [("0", 422), ("5", 422), ("a", 400), ("07", 400), ("-1", 400),
                         ("123456", 400), ("1\x00", 400), (7, 400), ("3 ", 400)]:
        resp_ = await api.post("/api/v1/targets/main/restores",
                               json={"backup": name, "into_database": into})
        assert resp_.status == status, (into, await resp_.text())
        assert (await resp_.json())["error"]["code"] in ("invalid_body", "database_refused")
    job = await restore(api, name, into_database="99999")  # the server has 16
    assert job["status"] == "failed" and job["error"]["code"] == "database_refused", job
    resp_ = await api.post("/api/v1/targets/main/restores",
                           json={"backup": name, "replace": True})
    assert resp_.status == 400
    assert await fingerprint(redis_port) == before


async def test_a_failed_load_beside_leaves_the_index_as_it_was(
        api: Any, worker: Any, redis_port: int, storage_dir: Path) -> None:
    """A payload Redis refuses mid-load: an index that was empty is emptied again (the
    keys written before the failure go); an index restored over with replace is rolled
    back from its safety backup. The live index is never touched."""
    await load(redis_port)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    plain = gzip.decompress(await stored_bytes(storage_dir, good))
    bad = "upload_redis_20200101_000000.resp.gz"
    await publish_plain(storage_dir, bad, plain + resp(
        b"RESTORE", b"broken", b"0", b"not a dump payload", b"REPLACE"), manifest)
    before = await fingerprint(redis_port)
    job = await restore(api, bad, into_database="9")
    assert job["status"] == "failed", job
    assert job["error"]["database_state"] == "unchanged", job["error"]
    assert await fingerprint(redis_port) == before

    r9 = Redis(port=redis_port, password=PW, db=9)
    await r9.set("kept", "yes")
    before = await fingerprint(redis_port)
    job = await restore(api, bad, into_database="9", replace=True)
    assert job["status"] == "failed", job
    assert job["error"]["database_state"] == "rolled_back", job["error"]
    assert await fingerprint(redis_port) == before
    await r9.aclose()
