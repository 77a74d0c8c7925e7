"""A manifest read back from storage is hostile input (issue 20.4): one that disagrees with
its object (time, file name, codec chain…) is listed as damaged — the rest of the listing
stands — a restore refuses it, and it never decides what a prune deletes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from api.app import create_app
from shared import manifests, naming
from shared.config import Settings, parse_settings
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import backup, running_worker, wait_for_terminal


@pytest.fixture
def settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str]) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["retention"] = {"keep_last": 1}
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


def tamper(storage_dir: Path, name: str, **fields: Any) -> None:
    path = storage_dir / f"{name}.json"
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


async def three_backups(api: Any, pg_db: str) -> list[str]:
    await pg.load_rich(pg_db)
    return [(await backup(api))["result"]["filename"] for _ in range(3)]


async def listed(api: Any, path: str = "/api/v1/targets/main/backups"
                 ) -> dict[str, dict[str, Any]]:
    resp = await api.get(path)
    body = await resp.json()
    assert resp.status == 200, body
    return {b["filename"]: b for b in body["backups"]}


async def test_a_manifest_from_the_future_never_decides_a_prune(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """The oldest of three backups claims 2099: it used to be 'newest', so keep_last = 1
    kept it and deleted the two real newest. Now it is damaged (the name's time wins): the
    real newest is kept, the middle one pruned, the planted one left for a person."""
    oldest, middle, newest = await three_backups(api, pg_db)
    tamper(storage_dir, oldest, created_at="2099-01-01T00:00:00Z")
    backups = await listed(api)
    assert backups[oldest]["damaged"].startswith("its created_at 2099-01-01T00:00:00Z")
    assert backups[oldest]["created_at"] == manifests.name_time(naming.parse(oldest))
    assert list(backups)[0] == newest  # ordered by the names' times
    job = await (await api.post("/api/v1/targets/main/prune?wait=60")).json()
    assert job["status"] == "succeeded", job
    assert job["result"]["destinations"]["local"]["deleted"] == [middle]
    after = await listed(api)
    assert set(after) == {newest, oldest} and after[oldest]["damaged"]
    # a damaged backup cannot be restored, and says why; an admin may delete it
    resp = await api.post("/api/v1/targets/main/restores", json={"backup": oldest})
    err = (await resp.json())["error"]
    assert resp.status == 422 and err["code"] == "damaged_manifest", err
    assert "created_at" in err["message"]
    assert (await api.delete(f"/api/v1/targets/main/backups/{oldest}")).status == 200
    assert set(await listed(api)) == {newest}


async def test_an_unknown_codec_marks_one_backup_not_the_listing(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """`"codecs": [{"codec": "rot13"}]` on one backup answered 500 for the whole target
    on REST, /backup/list and MCP; now that backup is damaged and the others are listed."""
    first, second, third = await three_backups(api, pg_db)
    tamper(storage_dir, second, codecs=[{"codec": "rot13"}])
    for path in ("/api/v1/targets/main/backups", "/backup/list"):
        backups = await listed(api, path)
        assert set(backups) == {first, second, third}, path
        assert "unknown codec" in backups[second]["damaged"], path
        assert not backups[first].get("damaged") and not backups[third].get("damaged")
    one = await api.get(f"/api/v1/targets/main/backups/{second}")
    assert one.status == 422 and (await one.json())["error"]["code"] == "damaged_manifest"
    download = await api.get(f"/api/v1/targets/main/backups/{second}/download")
    assert download.status == 422
    text = await (await api.get("/metrics")).text()
    assert 'safehold_backups_damaged{target="main"} 1.0' in text
    assert 'safehold_backups{target="main"} 3.0' in text


async def test_a_manifest_naming_another_file_is_damaged(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """`"filename": "../../../../tmp/x.db.gz"` was listed under that name and a prune then
    failed on it after deleting others. The object's key is the name."""
    first, second, third = await three_backups(api, pg_db)
    tamper(storage_dir, first, filename="../../../../tmp/x.db.gz")
    backups = await listed(api)
    assert set(backups) == {first, second, third}
    assert "not its own" in backups[first]["damaged"]
    job = await (await api.post("/api/v1/targets/main/prune?wait=60")).json()
    assert job["status"] == "succeeded", job
    assert job["result"]["destinations"]["local"]["deleted"] == [second]
    assert set(await listed(api)) == {first, third}


@pytest.mark.parametrize("content, why", [
    (b"\x00\xff not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"filename": 1}', "not its own"),
    (b'{"codecs": [{"codec": []}]}', "cannot be read (TypeError)"),  # unhashable codec
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nested past Python's depth
])
async def test_unreadable_manifests_are_listed_as_damaged(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, content: bytes,
        why: str) -> None:
    await pg.load_rich(pg_db)
    good, bad = [(await backup(api))["result"]["filename"] for _ in range(2)]
    (storage_dir / f"{bad}.json").write_bytes(content)
    backups = await listed(api)
    assert set(backups) == {good, bad}
    assert why in backups[bad]["damaged"] and not backups[good].get("damaged")
    job = await (await api.post("/api/v1/targets/main/prune?wait=60")).json()
    assert job["status"] == "succeeded", job  # a damaged manifest never stops retention
    resp = await api.delete(f"/api/v1/targets/main/backups/{bad}")
    assert resp.status == 200, await resp.text()  # and it can be removed


async def test_a_manifest_bomb_is_not_read_whole(
        aiohttp_client: Any, redis: Redis, settings: Settings, pg_db: str,
        storage_dir: Path) -> None:
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        name = (await backup(api))["result"]["filename"]
    with (storage_dir / f"{name}.json").open("wb") as f:
        f.write(b'{"x": "' + b"a" * (manifests.MAX_MANIFEST_BYTES + 10) + b'"}')
    backups = await listed(api)
    assert "larger than any manifest" in backups[name]["damaged"]


async def test_a_queued_restore_runs_only_the_bytes_it_was_submitted_for(
        api: Any, settings: Settings, pg_db: str, storage_dir: Path) -> None:
    """Issue 20.5: a restore waits in the queue; meanwhile its file and manifest are
    replaced by another, fully consistent backup under the same name. The job refuses it
    (`backup_changed`) instead of restoring the new content as the one chosen."""
    await pg.load_rich(pg_db)
    async with running_worker(settings):
        chosen = (await backup(api))["result"]["filename"]
        conn = await pg.user_conn(pg_db)
        await conn.execute("DELETE FROM everything WHERE id % 2 = 0")
        await conn.close()
        other = (await backup(api))["result"]["filename"]
    before = await pg.fingerprint(pg_db)
    job = await (await api.post("/api/v1/targets/main/restores",
                                json={"backup": chosen})).json()
    assert job["status"] == "queued" and job["params"]["sha256"]
    # the swap: the other backup's bytes, its manifest made to agree with the chosen name
    (storage_dir / chosen).write_bytes((storage_dir / other).read_bytes())
    doc = json.loads((storage_dir / f"{other}.json").read_text())
    doc.update(filename=chosen, created_at=manifests.name_time(naming.parse(chosen)))
    (storage_dir / f"{chosen}.json").write_text(json.dumps(doc))
    assert not (await listed(api))[chosen].get("damaged")  # a consistent lie
    async with running_worker(settings):
        done = await wait_for_terminal(api, job["id"], timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "backup_changed", done["error"]
    assert done["error"]["database_state"] == "unchanged"
    assert await pg.fingerprint(pg_db) == before
