"""Issue 20.8: a restore over a database the application is using does not wait silently.

An application session idle in a transaction that has read a table holds a lock the
restore's clean needs. The restore names it (user, application, state, since when) in its
progress and events, gives up after the target's `lock_timeout` with `database_state:
unchanged`, and with `"terminate_connections": true` ends the application's sessions and
goes through."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pymysql
import pytest
from redis.asyncio import Redis

from api.app import create_app
from shared.config import Settings, parse_settings
from tests import my, pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import backup, restore, running_worker, wait_for


def pg_settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str],
                lock_timeout: float) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["lock_timeout"] = lock_timeout
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


async def app_session_in_transaction(pg_db: str) -> asyncpg.Connection:
    """The application: reads a table in a transaction, then sits idle in it."""
    conn = await asyncpg.connect(host=pg.PG_HOST, port=pg.PG_PORT, user=pg.TEST_USER,
                                 password=pg.TEST_PASSWORD, database=pg_db,
                                 server_settings={"application_name": "webapp"})
    await conn.execute("BEGIN")
    await conn.fetchval("SELECT count(*) FROM everything")
    return conn


async def follow_until_running_with_blockers(api: Any, job_id: str) -> dict[str, Any]:
    async def blocked() -> dict[str, Any] | None:
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        return job if job["progress"].get("waiting_for") else None
    try:
        found: dict[str, Any] = await wait_for(blocked, 60, "the restore to name its blockers")
    except AssertionError:
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        events = await (await api.get(f"/api/v1/jobs/{job_id}/events",
                                      headers={"Accept": "application/json"})).text()
        raise AssertionError(f"no blockers named: {job}\n{events[-3000:]}") from None
    return found


async def test_pg_restore_names_the_blocking_session_and_gives_up_unchanged(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    settings = pg_settings(prefix, tmp_path, pg_db, test_env, lock_timeout=4)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    await pg.load_rich(pg_db)
    async with running_worker(settings):
        good = (await backup(api))["result"]["filename"]
        app = await app_session_in_transaction(pg_db)
        try:
            await app.execute("UPDATE everything SET flag = NOT flag WHERE id = 1")
            before = await pg.fingerprint(pg_db)  # (from another session: the update is
            # not committed, so it is not part of it)
            job_id = (await (await api.post("/api/v1/targets/main/restores",
                                            json={"backup": good})).json())["id"]
            running = await follow_until_running_with_blockers(api, job_id)
            blocker = running["progress"]["waiting_for"][0]
            assert blocker["application"] == "webapp", blocker
            assert blocker["state"] == "idle in transaction", blocker
            assert blocker["user"] == pg.TEST_USER and blocker["since"], blocker
            job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
            while job["status"] == "running":
                await asyncio.sleep(0.5)
                job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        finally:
            still_there = not app.is_closed()
            await app.close()
    assert still_there  # nothing of the application was ended
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "lock_timeout", job["error"]
    assert job["error"]["database_state"] == "unchanged", job["error"]
    assert "webapp" in job["error"]["message"] and "terminate_connections" in \
        job["error"]["message"]
    assert await pg.fingerprint(pg_db) == before
    events = await (await api.get(f"/api/v1/jobs/{job_id}/events",
                                  headers={"Accept": "application/json"})).text()
    assert "waits for locks held by" in events and "webapp" in events


async def test_pg_restore_with_terminate_connections_goes_through(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    settings = pg_settings(prefix, tmp_path, pg_db, test_env, lock_timeout=120)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    await pg.load_rich(pg_db)
    async with running_worker(settings):
        good = (await backup(api))["result"]["filename"]
        backed_up = await pg.fingerprint(pg_db)
        conn = await pg.user_conn(pg_db)
        await conn.execute("DELETE FROM everything WHERE id < 100")  # the damage
        await conn.close()
        app = await app_session_in_transaction(pg_db)
        try:
            job = await restore(api, good, wait=90, terminate_connections=True)
        finally:
            ended = app.is_closed() or await _dead(app)
            await app.close()
    assert job["status"] == "succeeded", job
    assert ended  # the application's session was ended
    assert await pg.fingerprint(pg_db) == backed_up
    events = await (await api.get(f"/api/v1/jobs/{job['id']}/events",
                                  headers={"Accept": "application/json"})).text()
    assert "terminate_connections" in events and "webapp" in events


async def _dead(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError):
        return True
    return False


async def test_terminate_connections_is_refused_where_it_means_nothing(
        api: Any, tmp_path: Path) -> None:
    resp = await api.post("/api/v1/targets/main/restores",
                          json={"backup": "backup_postgresql_20240101_000000.sql.gz",
                                "terminate_connections": "yes"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "invalid_body"


# ----------------------------------------------------------------------- MySQL/MariaDB
MY_PW_ENV = "SAFEHOLD_TEST_MY_PASSWORD"


def my_settings(prefix: str, tmp_path: Path, my_db: str, lock_timeout: float) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "mysql", "password_env": MY_PW_ENV,
                               "lock_timeout": lock_timeout,
                               "url": f"mysql://{my.USER}@{my.HOST}:{my.PORT}/{my_db}"}}
    return parse_settings(raw, {MY_PW_ENV: my.PASSWORD}, base=tmp_path, source="<test>")


async def my_app_in_transaction(my_db: str) -> Any:
    conn = await my.user_conn(my_db)
    await conn.autocommit(False)
    async with conn.cursor() as cur:
        await cur.execute("BEGIN")
        await cur.execute("SELECT count(*) FROM item")
    return conn


async def test_mysql_restore_names_the_blocker_and_gives_up_unchanged(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, my_db: str) -> None:
    settings = my_settings(prefix, tmp_path, my_db, lock_timeout=4)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    await my.load_rich(my_db)
    async with running_worker(settings):
        good = (await backup(api))["result"]["filename"]
        before = await my.fingerprint(my_db)
        app = await my_app_in_transaction(my_db)
        try:
            job_id = (await (await api.post("/api/v1/targets/main/restores",
                                            json={"backup": good,
                                                  "create_safety_backup": True})).json())["id"]
            running = await follow_until_running_with_blockers(api, job_id)
            blocker = running["progress"]["waiting_for"][0]
            assert blocker["user"] == my.USER, blocker
            while (job := await (await api.get(f"/api/v1/jobs/{job_id}")).json())[
                    "status"] == "running":
                await asyncio.sleep(0.5)
            async with app.cursor() as cur:  # the application's session is still there
                await cur.execute("SELECT 1")
        finally:
            app.close()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "lock_timeout", job["error"]
    assert job["error"]["database_state"] == "unchanged", job["error"]
    assert await my.fingerprint(my_db) == before


async def test_mysql_restore_with_terminate_connections_goes_through(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, my_db: str) -> None:
    settings = my_settings(prefix, tmp_path, my_db, lock_timeout=120)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    await my.load_rich(my_db)
    async with running_worker(settings):
        good = (await backup(api))["result"]["filename"]
        backed_up = await my.fingerprint(my_db)
        app = await my_app_in_transaction(my_db)
        try:
            job = await restore(api, good, wait=90, terminate_connections=True)
            with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
                async with app.cursor() as cur:
                    await cur.execute("SELECT 1")
        finally:
            app.close()
    assert job["status"] == "succeeded", job
    assert await my.fingerprint(my_db) == backed_up
