"""A MongoDB restore beside the live database (issue 25, `into_database`): the backup's one
database loaded under a new name — documents, indexes, validators, views — the live one
untouched; a name taken is refused (no replace); system, own and hostile names refused
before any job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings
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
    resp = await api.post("/api/v1/targets/main/restores",
                          json={"backup": name, "into_database": copy, "replace": True})
    assert resp.status == 422
