"""A MariaDB restore beside the live database (issue 25, `into_database`): the copy is the
backup (tables, views, triggers, routines, events), the live database never touched; an
existing database is refused unless `replace`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings
from tests import my
from tests.conftest import JobWaiter


@pytest.fixture
def settings(prefix: str, tmp_path: Path, my_db: str) -> Settings:
    return my.target_settings(prefix, tmp_path, my_db)


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


async def test_the_copys_scheduled_events_are_disabled(
        api: Any, worker: Any, my_db: str, wait_job: JobWaiter) -> None:
    """A copy beside the live database must not act on its own: an enabled event (which
    could name the live database) is disabled in the copy, and stays enabled in the live
    one."""
    conn = await my.user_conn(my_db)
    await my.execute(conn, "CREATE TABLE t (i int)",
                     f"CREATE EVENT purge_t ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01' "
                     f"ENABLE DO DELETE FROM `{my_db}`.t")
    conn.close()
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    beside = f"{my_db}_quiet"
    try:
        resp = await api.post("/api/v1/targets/main/restores", json={
            "backup": job["result"]["filename"], "into_database": beside})
        job = await wait_job((await resp.json())["id"], timeout=120)
        assert job["status"] == "succeeded", job.get("error")
        assert any("event(s) of the copy" in w for w in job["result"]["warnings"])
        conn = await my.user_conn(my_db)
        status = dict((await my.execute(
            conn, "SELECT EVENT_SCHEMA, STATUS FROM information_schema.EVENTS WHERE "
                  f"EVENT_NAME = 'purge_t' AND EVENT_SCHEMA IN ('{my_db}', '{beside}')"))[0])
        conn.close()
        assert status == {my_db: "ENABLED", beside: "DISABLED"}
    finally:
        await my.drop_database(beside)
