"""A MariaDB restore beside the live database (issue 25, `into_database`): the copy is the
backup (tables, views, triggers, routines, events), the live database never touched; an
existing database is refused unless `replace`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings, parse_settings
from tests import my
from tests.conftest import JobWaiter, make_raw_config

PW_ENV = "SAFEHOLD_TEST_MY_PASSWORD"


@pytest.fixture(scope="module", autouse=True)
def _user() -> None:
    asyncio.run(my.ensure_user())


@pytest.fixture
async def my_db() -> AsyncIterator[str]:
    name = await my.create_database()
    yield name
    await my.drop_database(name)


@pytest.fixture
def settings(prefix: str, tmp_path: Path, my_db: str) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "mysql", "password_env": PW_ENV,
                               "url": f"mysql://{my.USER}@{my.HOST}:{my.PORT}/{my_db}"}}
    return parse_settings(raw, {PW_ENV: my.PASSWORD}, base=tmp_path, source="<test>")


async def test_a_restore_beside_leaves_the_live_database_alone(
        api: Any, worker: Any, my_db: str, wait_job: JobWaiter) -> None:
    await my.load_rich(my_db)
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    assert job["status"] == "succeeded", job
    name = job["result"]["filename"]
    backed_up = await my.fingerprint(my_db)
    conn = await my.user_conn(my_db)
    await my.execute(conn, "DELETE FROM item WHERE id % 2 = 0", "DROP VIEW happy_items")
    conn.close()
    live = await my.fingerprint(my_db)
    beside = f"{my_db}_copy"
    try:
        async def restore(**body: Any) -> dict[str, Any]:
            resp = await api.post("/api/v1/targets/main/restores",
                                  json={"backup": name, "into_database": beside, **body})
            assert resp.status == 202, await resp.text()
            return await wait_job((await resp.json())["id"], timeout=120)
        job = await restore()
        assert job["status"] == "succeeded", job.get("error")
        assert await my.fingerprint(beside) == backed_up
        assert await my.fingerprint(my_db) == live
        job = await restore()
        assert job["status"] == "failed" and job["error"]["code"] == "database_exists", job
        job = await restore(replace=True)
        assert job["status"] == "succeeded" and job["result"]["safety_backup"], job
        assert await my.fingerprint(beside) == backed_up
    finally:
        await my.drop_database(beside)
