"""MongoDB engine against mongoeco's wire server (a stand-in; see ../shared/SERVICES.md)."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import tarfile
import uuid
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Regex, Timestamp, json_util
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel

from shared.config import Settings
from tests.helpers import (
    flip_byte,
    form,
    publish_plain,
    read_events,
    restore,
    restore_twice_unchanged,
    stored_manifest,
)
from tests.servers.conftest import mongo_settings  # noqa: E402


@pytest.fixture
def settings(prefix: str, tmp_path: Path, mongo_server: int, dbs: list[str]) -> Settings:
    """Override: target `main` is two databases on the stand-in, as user root."""
    return mongo_settings(prefix, tmp_path, mongo_server, dbs)


async def load(c: AsyncMongoClient[Any], dbs: list[str]) -> None:
    app, other = c[dbs[0]], c[dbs[1]]
    await app.create_collection("validated", validator={"n": {"$type": "int"}})
    docs = [{
        "_id": ObjectId(),
        "n": i,
        "when": dt.datetime(2024, 2, 29, 12, 0, i % 60, 123000),
        "price": Decimal128(f"{i}.0001"),
        "blob": Binary(bytes([0, i % 256, 0]) * 4, 0),
        "uid": Binary(uuid.UUID(int=i).bytes, 4),
        "big": Int64(2**40 + i),
        "pattern": Regex(r"^ab+c$", "i"),
        "ts": Timestamp(1700000000 + i, 1),
        "nested": {"list": [1, "two", None, {"deep": [i, i * 2]}], "ü": "ñ"},
        "email": f"user{i}@example.com",
        "group": i % 7,
        "expires_at": dt.datetime(2030, 1, 1),
    } for i in range(300)]
    await app.things.insert_many(docs)
    await app.things.create_indexes([
        IndexModel([("email", ASCENDING)], unique=True, name="email_unique"),
        IndexModel([("group", ASCENDING), ("n", DESCENDING)], name="group_n"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=3600, name="ttl"),
        IndexModel([("n", ASCENDING)], name="partial_n",
                   partialFilterExpression={"group": {"$gt": 3}}),
    ])
    await app.validated.insert_many([{"n": i} for i in range(20)])
    await app.create_collection("big_things", viewOn="things", pipeline=[
        {"$match": {"n": {"$gt": 250}}}])
    await other.notes.insert_many([{"_id": i, "text": f"note {i}"} for i in range(50)])


async def fingerprint(c: AsyncMongoClient[Any], dbs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dbs:
        async for info in await c[d].list_collections():
            name = info["name"]
            out[f"{d}.{name}:options"] = json_util.dumps(info.get("options") or {},
                                                         sort_keys=True)
            if "viewOn" in (info.get("options") or {}):
                continue
            raw = []
            async for batch in c[d][name].find_raw_batches(sort=[("_id", ASCENDING)]):
                raw.append(batch)
            out[f"{d}.{name}:data"] = hashlib.sha256(b"".join(raw)).hexdigest()
            idx = []
            async for ix in await c[d][name].list_indexes():
                ix = dict(ix)
                ix.pop("ns", None)
                ix.pop("v", None)
                idx.append(json_util.dumps(ix, sort_keys=True))
            out[f"{d}.{name}:indexes"] = sorted(idx)
    return out


async def backup(api: Any) -> dict[str, Any]:
    job = await (await api.post("/api/v1/targets/main/backups?wait=120")).json()
    assert job["status"] == "succeeded", job
    return job


async def test_round_trip(api: Any, worker: Any, mongo: Any, dbs: list[str],
                          storage_dir: Path) -> None:
    """All BSON types, unique/compound/TTL/partial indexes, a validator, a view, several
    collections and a second database survive a clean restore."""
    await load(mongo, dbs)
    before = await fingerprint(mongo, dbs)
    job = await backup(api)
    name = job["result"]["filename"]
    assert name.startswith("backup_mongodb_") and name.endswith(".tar.gz")
    await mongo[dbs[0]].things.delete_many({"n": {"$lt": 100}})
    await mongo[dbs[0]].drop_collection("big_things")
    await mongo[dbs[1]].notes.drop_indexes()
    await mongo[dbs[1]].intruder.insert_one({"x": 1})
    job = await (await api.post("/api/v1/targets/main/restores?wait=180",
                                json={"backup": name})).json()
    assert job["status"] == "succeeded", job
    # exactly the backup's state: the collection created since is gone too (unlike
    # `mongorestore --drop`, which leaves collections the dump does not hold)
    assert await fingerprint(mongo, dbs) == before


async def test_mongodump_layout(api: Any, worker: Any, mongo: Any, dbs: list[str],
                                storage_dir: Path) -> None:
    """The tar holds mongodump's layout: <db>/<coll>.bson readable as BSON, and
    <db>/<coll>.metadata.json with indexes, options and type (what mongorestore reads)."""
    await load(mongo, dbs)
    job = await backup(api)
    with tarfile.open(storage_dir / job["result"]["filename"], "r:gz") as tar:
        names = set(tar.getnames())
        assert {f"{dbs[0]}/things.bson", f"{dbs[0]}/things.metadata.json",
                f"{dbs[0]}/big_things.metadata.json", f"{dbs[1]}/notes.bson",
                "prelude.json"} <= names
        assert f"{dbs[0]}/big_things.bson" not in names  # views have metadata only
        docs = list(bson.decode_file_iter(tar.extractfile(f"{dbs[0]}/things.bson")))
        assert len(docs) == 300 and isinstance(docs[0]["price"], Decimal128)
        meta = json_util.loads(tar.extractfile(f"{dbs[0]}/things.metadata.json").read())
        assert meta["collectionName"] == "things" and meta["type"] == "collection"
        by_name = {ix["name"]: ix for ix in meta["indexes"]}
        assert by_name["email_unique"]["unique"] is True
        assert by_name["ttl"]["expireAfterSeconds"] == 3600
        view = json_util.loads(tar.extractfile(f"{dbs[0]}/big_things.metadata.json").read())
        assert view["type"] == "view" and view["options"]["viewOn"] == "things"
    manifest = await stored_manifest(storage_dir, job['result']['filename'])
    assert manifest["counts"][f"{dbs[0]}.things"] == 300
    assert manifest["consistency"]


async def test_failing_restore_rolls_back(api: Any, worker: Any, mongo: Any, dbs: list[str],
                                          storage_dir: Path) -> None:
    """Duplicate _ids in a backup fail the insert; the safety backup is restored."""
    await load(mongo, dbs)
    good = (await backup(api))["result"]["filename"]
    before = await fingerprint(mongo, dbs)
    manifest = await stored_manifest(storage_dir, good)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add(f"{dbs[1]}/notes.metadata.json", b'{"indexes": [], "type": "collection"}')
        add(f"{dbs[1]}/notes.bson", bson.encode({"_id": 1}) + bson.encode({"_id": 1}))
    bad = "backup_mongodb_20200101_000000.tar.gz"
    await publish_plain(storage_dir, bad, buf.getvalue(), manifest)
    job = await (await api.post("/api/v1/targets/main/restores?wait=180",
                                json={"backup": bad})).json()
    assert job["status"] == "failed"
    assert job["error"]["database_state"] == "rolled_back", job["error"]
    assert await fingerprint(mongo, dbs) == before


async def test_checksum_progress_and_stats(api: Any, worker: Any, mongo: Any, dbs: list[str],
                                           storage_dir: Path) -> None:
    """Tampered backups are refused untouched; collections are counted over SSE; stats say
    where they are partial."""
    await load(mongo, dbs)
    job = await backup(api)
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    assert "dumping" in [e["data"]["phase"] for e in events if e["event"] == "phase"]
    assert job["progress"]["item_kind"] == "collections"
    assert job["progress"]["items_done"] == job["progress"]["items_total"] == 4
    path = storage_dir / job["result"]["filename"]
    flip_byte(path, path.stat().st_size - 30)
    before = await fingerprint(mongo, dbs)
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": job["result"]["filename"]})).json()
    assert job["error"]["code"] == "checksum_mismatch"
    assert await fingerprint(mongo, dbs) == before
    stats = await (await api.get("/api/v1/targets/main/stats")).json()
    colls = {c["name"]: c for c in stats["databases"][0]["collections"]}
    assert colls["things"]["documents_estimate"] == 300
    assert colls["big_things"]["type"] == "view"
    assert stats["partial"] is True  # collStats fails on the stand-in once Decimal128 is stored


async def test_restore_twice_over_the_live_database(api: Any, worker: Any, mongo: Any,
                                                    dbs: list[str]) -> None:
    """Views, validators, indexes: restoring over the untouched data, twice, changes
    nothing; a collection created after the backup is removed by the next restore."""
    await load(mongo, dbs)
    before = await fingerprint(mongo, dbs)
    name = (await backup(api))["result"]["filename"]
    await restore_twice_unchanged(api, name, lambda: fingerprint(mongo, dbs), before)


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("case", ["$where validator", "admin database", "system collection",
                                  "path outside the layout", "escaped $function",
                                  "another database"])
async def test_hostile_archives_are_refused_before_anything_is_dropped(
        api: Any, worker: Any, mongo: Any, dbs: list[str], storage_dir: Path,
        case: str) -> None:
    await load(mongo, dbs)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    meta = b'{"indexes": [], "type": "collection", "options": {}}'
    members = {
        "$where validator": {f"{dbs[0]}/evil.metadata.json":
                             b'{"options": {"validator": {"$where": "sleep(100000)"}}}'},
        "admin database": {"admin/system.users.metadata.json": meta,
                           "admin/system.users.bson": bson.encode({"_id": "x.y"})},
        "system collection": {f"{dbs[0]}/system.js.bson": bson.encode({"_id": "f"})},
        "path outside the layout": {"../../etc/x.bson": bson.encode({"_id": 1})},
        "escaped $function": {f"{dbs[0]}/v.metadata.json": (
            b'{"options": {"viewOn": "things", "pipeline": [{"$addFields": {"x": '
            b'{"\\u0024function": {"body": "f", "args": [], "lang": "js"}}}}]}}')},
        "another database": {"someone_elses_db/things.bson": bson.encode({"_id": 1})},
    }[case]
    blob = tar_of({f"{dbs[0]}/things.metadata.json": meta, **members})
    resp = await api.post("/api/v1/targets/main/uploads", data=form(gzip.compress(blob),
                                                                    "x.tar.gz"))
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "unsafe_backup", body
    before = await fingerprint(mongo, dbs)
    bad = "upload_mongodb_20200101_000000.tar.gz"
    await publish_plain(storage_dir, bad, blob, manifest)
    job = await restore(api, bad)
    assert job["status"] == "failed" and job["error"]["code"] == "unsafe_backup", job
    assert job["error"]["database_state"] == "unchanged"
    assert await fingerprint(mongo, dbs) == before


async def test_restore_drill_into_temporary_databases(api: Any, worker: Any, mongo: Any,
                                                      dbs: list[str]) -> None:
    """A drill restores every database under a `safehold_drill_…_` prefix, compares the
    documents per collection with the dump's, and drops them; the live ones are untouched."""
    await load(mongo, dbs)
    before = await fingerprint(mongo, dbs)
    await backup(api)
    job = await (await api.post("/api/v1/targets/main/verify?wait=180", json={})).json()
    assert job["status"] == "succeeded", job.get("error")
    result = job["result"]
    assert result["mode"] == "scratch-restore" and result["counts_compared"] >= 3
    assert result["mismatches"] is None and result["rows_restored"] > 0
    assert await fingerprint(mongo, dbs) == before
    prefix = result["scratch"].split()[-1].replace("<db>", "")
    for db in dbs:  # dropped (listDatabases is not needed, nor asked of the stand-in)
        assert await mongo[f"{prefix}{db}"].list_collection_names() == []


async def test_one_collection_restored_the_rest_left_as_it_is(
        api: Any, worker: Any, mongo: Any, dbs: list[str]) -> None:
    """Issue 25 `tables` on MongoDB (`db.collection`): `things` is the backup's again (its
    documents and indexes) while the other collections — and a collection made since —
    are exactly as they are now; twice; the safety backup holds that collection only; a
    collection the backup lacks and hostile names are refused before any job."""
    await load(mongo, dbs)
    name = (await backup(api))["result"]["filename"]
    backed_up = await fingerprint(mongo, dbs)
    await mongo[dbs[0]].things.update_many({}, {"$set": {"group": 0}})
    await mongo[dbs[0]].things.drop_index("group_n")
    await mongo[dbs[1]].notes.delete_many({"_id": {"$lt": 10}})
    await mongo[dbs[1]].since.insert_one({"x": 1})
    live = await fingerprint(mongo, dbs)
    things = f"{dbs[0]}.things"
    for _ in range(2):
        job = await (await api.post("/api/v1/targets/main/restores?wait=180", json={
            "backup": name, "tables": [things]})).json()
        assert job["status"] == "succeeded", job.get("error")
        now = await fingerprint(mongo, dbs)
        for key, value in now.items():
            expected = backed_up if key.startswith(things + ":") else live
            assert value == expected[key], key
        assert set(now) == set(live)
    safety = job["result"]["safety_backup"]
    manifest = await (await api.get(f"/api/v1/targets/main/backups/{safety}")).json()
    assert manifest["only_tables"] == [things] and list(manifest["counts"]) == [things]
    for tables, status in [([f"{dbs[0]}.nothere"], 422), ([f"{dbs[0]}.system.users"], 422),
                           (["things"], 422), ([f"{dbs[0]}/../x.things"], 400)]:
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "tables": tables})
        assert resp.status == status, (tables, await resp.text())

