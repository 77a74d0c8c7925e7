"""A MongoDB restore beside the live database (issue 25, `into_database`): the backup's one
database loaded under a new name — documents, indexes, validators, views — the live one
untouched; a name taken is refused (no replace); system, own and hostile names refused
before any job."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings, parse_settings
from tests.conftest import MONGO_PASSWORD, make_raw_config
from tests.servers.test_engine_mongodb import PW_ENV, backup, client, fingerprint, load


@pytest.fixture
def dbs() -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"app_{tag}", f"other_{tag}"]


@pytest.fixture
async def mongo(mongo_server: int, dbs: list[str]) -> AsyncIterator[Any]:
    c = client(mongo_server)
    yield c
    for d in [*dbs, f"copy_{dbs[0]}"]:
        await c.drop_database(d)
    await c.close()


@pytest.fixture
def settings(prefix: str, tmp_path: Path, mongo_server: int, dbs: list[str]) -> Settings:
    """Target `main` is one database."""
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {
        "engine": "mongodb", "password_env": PW_ENV,
        "url": f"mongodb://root@127.0.0.1:{mongo_server}/{dbs[0]}"
               "?directConnection=true&authMechanism=SCRAM-SHA-256"}}
    return parse_settings(raw, {PW_ENV: MONGO_PASSWORD}, base=tmp_path, source="<test>")


async def test_a_restore_beside_under_a_new_name(api: Any, worker: Any, mongo: Any,
                                                 dbs: list[str]) -> None:
    app, copy = dbs[0], f"copy_{dbs[0]}"
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
    resp = await api.post("/api/v1/targets/main/restores",
                          json={"backup": name, "into_database": copy, "replace": True})
    assert resp.status == 422
