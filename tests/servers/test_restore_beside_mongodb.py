"""A MongoDB restore beside the live database (issue 25, `into_database`): the backup's one
database loaded under a new name — documents, indexes, validators, views — the live one
untouched; a name taken is refused (no replace); system, own and hostile names refused
before any job."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import bson
import pytest

from shared.config import Settings
from tests.helpers import publish_plain, restore, stored_manifest
from tests.servers.conftest import mongo_settings
from tests.servers.test_engine_mongodb import backup, fingerprint, load


@pytest.fixture
def settings(prefix: str, tmp_path: Path, mongo_server: int, dbs: list[str]) -> Settings:
    """Target `main` is one database."""
    return mongo_settings(prefix, tmp_path, mongo_server, dbs[:1])


async def test_a_restore_beside_under_a_new_name(api: Any, worker: Any, mongo: Any,
                                                 dbs: list[str]) -> None:
    app, copy = dbs[0], f"copy_{dbs[0]}"
    try:
        await beside(api, mongo, dbs, app, copy)
    finally:
        await mongo.drop_database(copy)


async def beside(api: Any, mongo: Any, dbs: list[str], app: str, copy: str) -> None:
    await load(mongo, dbs)
    name = (await backup(api))["result"]["filename"]
    backed_up = await fingerprint(mongo, [app])
    await mongo[app].things.delete_many({})
    live = await fingerprint(mongo, [app])
    job = await (await api.post("/api/v1/targets/main/restores?wait=120", json={
        "backup": name, "into_database": copy})).json()
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["safety_backup"] is None
    copied = await fingerprint(mongo, [copy])
    assert {k.replace(copy, app, 1): v for k, v in copied.items()} == backed_up
    assert await fingerprint(mongo, [app]) == live
    job = await (await api.post("/api/v1/targets/main/restores?wait=120", json={
        "backup": name, "into_database": copy})).json()
    assert job["status"] == "failed" and job["error"]["code"] == "database_exists", job
    assert await fingerprint(mongo, [copy]) == copied
    for into, status in [("admin", 422), (app, 422), ("a.b", 400), ("x" * 100, 400),
                         ("safehold_drill_x", 422)]:
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "into_database": into})
        assert resp.status == status, (into, await resp.text())
    await mongo[copy].stray.insert_one({"made": "since"})
    await mongo[copy].things.delete_many({})
    for _ in range(2):  # replace: over the copy like a live database, its safety backup first
        job = await (await api.post("/api/v1/targets/main/restores?wait=120", json={
            "backup": name, "into_database": copy, "replace": True})).json()
        assert job["status"] == "succeeded", job.get("error")
        assert job["result"]["safety_backup"], job["result"]
        assert await fingerprint(mongo, [copy]) == copied
        assert await fingerprint(mongo, [app]) == live


async def test_a_failed_load_beside_leaves_the_server_as_it_was(
        api: Any, worker: Any, mongo: Any, dbs: list[str], storage_dir: Path) -> None:
    """Duplicate _ids fail the load mid-way: a new database is dropped again; one restored
    over with replace is rolled back from its safety backup; the live database (the
    backup's own) is never touched — a rollback's reach follows the copy's name."""
    app, copy = dbs[0], f"copy_{dbs[0]}"
    await load(mongo, dbs)
    manifest = await stored_manifest(storage_dir, (await backup(api))["result"]["filename"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, data in [(f"{app}/notes.metadata.json",
                              b'{"indexes": [], "type": "collection"}'),
                             (f"{app}/notes.bson",
                              bson.encode({"_id": 1}) + bson.encode({"_id": 1}))]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bad = "backup_mongodb_20200101_000000.tar.gz"
    await publish_plain(storage_dir, bad, buf.getvalue(), manifest)
    live = await fingerprint(mongo, [app])
    try:
        job = await restore(api, bad, into_database=copy)
        assert job["status"] == "failed", job
        assert job["error"]["database_state"] == "unchanged", job["error"]
        assert not await mongo[copy].list_collection_names()
        await mongo[copy].kept.insert_one({"n": 1})
        before = await fingerprint(mongo, [copy])
        job = await restore(api, bad, into_database=copy, replace=True)
        assert job["status"] == "failed", job
        assert job["error"]["database_state"] == "rolled_back", job["error"]
        assert await fingerprint(mongo, [copy]) == before
        assert await fingerprint(mongo, [app]) == live
    finally:
        await mongo.drop_database(copy)


async def test_documents_of_one_collection_read_from_the_backup(
        api: Any, worker: Any, mongo: Any, dbs: list[str]) -> None:
    """Which backup still has document n=7? Read from the backup's tar, nothing restored;
    stops at `limit`; an unknown collection or field is refused."""
    app = dbs[0]
    await load(mongo, dbs)
    name = (await backup(api))["result"]["filename"]
    await mongo[app].things.delete_many({})
    base = f"/api/v1/targets/main/backups/{name}/contents/{app}.things"
    got = await (await api.get(f"{base}?where=n=7")).json()
    assert len(got["rows"]) == 1, got
    row = dict(zip(got["columns"], got["rows"][0], strict=True))
    assert row["n"] == "7" and row["email"] == "user7@example.com"
    assert got["complete"] is True
    got = await (await api.get(f"{base}?limit=3")).json()
    assert len(got["rows"]) == 3 and got["complete"] is False
    got = await (await api.get(f"{base}?where=nope=1")).json()
    assert got["rows"] == []
    resp = await api.get(f"/api/v1/targets/main/backups/{name}/contents/{app}.nothere")
    assert resp.status == 422, await resp.text()
