"""A PostgreSQL restore beside the live database (issue 25, `into_database`): the copy is
the backup, the live database is never touched, an existing database is refused unless
`replace` (then its safety backup first), twice in a row; hostile names are refused before
any job exists; a failed load drops the database it created."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings, parse_settings
from tests import pg
from tests.conftest import JobWaiter, make_raw_config
from tests.helpers import backup


@pytest.fixture
def settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str],
             createdb_role: str) -> Settings:
    """Target `main` reached as a role that may create databases; target `other` backs up
    another database of the same server."""
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["url"] = raw["targets"]["main"]["url"].replace(
        f"{pg.TEST_USER}@", f"{createdb_role}@")
    raw["targets"]["other"] = {**raw["targets"]["main"],
                               "url": raw["targets"]["main"]["url"].replace(pg_db, "elsewhere")}
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


async def restore(api: Any, wait_job: JobWaiter, **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/v1/targets/main/restores", json=body)
    assert resp.status == 202, await resp.text()
    return await wait_job((await resp.json())["id"], timeout=120)


async def test_a_restore_beside_leaves_the_live_database_alone(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter, createdb_role: str) -> None:
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    backed_up = await pg.fingerprint(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("UPDATE everything SET texts = NULL; DROP TABLE \"Ärger\".\"Straße\"")
    await conn.close()
    live = await pg.fingerprint(pg_db)
    beside = f"{pg_db}_copy"
    try:
        job = await restore(api, wait_job, backup=name, into_database=beside)
        assert job["status"] == "succeeded", job.get("error")
        assert job["result"]["safety_backup"] is None  # nothing was there to keep
        assert "beside" in job["result"]["warnings"][0]
        assert await pg.fingerprint(beside) == backed_up
        assert await pg.fingerprint(pg_db) == live

        job = await restore(api, wait_job, backup=name, into_database=beside)
        assert job["status"] == "failed" and job["error"]["code"] == "database_exists", job
        assert job["error"]["database_state"] == "unchanged"

        copy = await pg.user_conn(beside)
        await copy.execute("DELETE FROM everything")
        await copy.close()
        job = await restore(api, wait_job, backup=name, into_database=beside, replace=True)
        assert job["status"] == "succeeded", job.get("error")
        assert job["result"]["safety_backup"]  # what was there is kept first
        assert await pg.fingerprint(beside) == backed_up
        assert await pg.fingerprint(pg_db) == live

        admin = await pg.admin_conn()  # a role that may not create databases is told how
        await admin.execute(f"ALTER ROLE {createdb_role} NOCREATEDB")
        await admin.close()
        job = await restore(api, wait_job, backup=name, into_database=f"{pg_db}_other")
        assert job["status"] == "failed", job
        assert f'ALTER ROLE "{createdb_role}" CREATEDB' in job["error"]["message"], job
        assert job["error"]["database_state"] == "unchanged"
    finally:
        await pg.drop_database(beside)


@pytest.mark.parametrize("into, status, code", [
    ('x"; DROP DATABASE postgres; --', 400, "invalid_body"),
    ("a.b", 400, "invalid_body"), ("..", 400, "invalid_body"), ("a\x00b", 400, "invalid_body"),
    ("x" * 10_000, 400, "invalid_body"), ("9lives", 400, "invalid_body"),
    ("template1", 422, "database_refused"), ("safehold_drill_x", 422, "database_refused"),
    ("elsewhere", 422, "database_refused"),  # target `other`'s database
])
async def test_hostile_names_are_refused_before_any_job(
        api: Any, pg_db: str, into: str, status: int, code: str) -> None:
    resp = await api.post("/api/v1/targets/main/restores", json={
        "backup": "backup_postgresql_20260101_000000.sql.gz", "into_database": into})
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["code"] == code
    jobs = await (await api.get("/api/v1/jobs")).json()
    assert jobs["jobs"] == []


async def test_the_own_database_and_replace_alone_are_refused(api: Any, pg_db: str) -> None:
    for body, status in [({"into_database": pg_db}, 422), ({"replace": True}, 400)]:
        resp = await api.post("/api/v1/targets/main/restores", json={
            "backup": "backup_postgresql_20260101_000000.sql.gz", **body})
        assert resp.status == status, (body, await resp.text())


async def test_a_failed_load_beside_drops_the_database_it_created(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter, storage_dir: Path) -> None:
    """The backup's bytes are fine but its load fails (it creates an extension only a
    superuser may, and the restore's role is not one): the new database is dropped again,
    the job says the server is unchanged, and a good backup then goes in."""
    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE t (i int); INSERT INTO t VALUES (1)")
    await conn.close()
    name = (await backup(api))["result"]["filename"]
    admin = await pg.admin_conn(pg_db)
    await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    await admin.close()
    name2 = (await backup(api))["result"]["filename"]  # needs CREATE EXTENSION: superuser
    beside = f"{pg_db}_failed"
    try:
        job = await restore(api, wait_job, backup=name2, into_database=beside)
        assert job["status"] == "failed", job
        assert job["error"]["database_state"] == "unchanged", job["error"]
        assert f"the database {beside} it created was dropped" in job["error"]["message"]
        admin = await pg.admin_conn()
        assert not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1",
                                        beside)
        await admin.close()
        job = await restore(api, wait_job, backup=name, into_database=beside)
        assert job["status"] == "succeeded", job.get("error")
    finally:
        await pg.drop_database(beside)


async def test_a_database_the_listing_leaves_out_is_never_loaded_into_or_dropped(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter) -> None:
    """A database that exists but takes no connections (so no listing shows it): the
    restore beside finds it at CREATE and refuses, and it is still there afterwards."""
    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE t (i int); INSERT INTO t VALUES (1)")
    await conn.close()
    name = (await backup(api))["result"]["filename"]
    hidden = f"{pg_db}_closed"
    admin = await pg.admin_conn()
    await admin.execute(f'CREATE DATABASE "{hidden}"')
    await admin.execute(f'ALTER DATABASE "{hidden}" ALLOW_CONNECTIONS false')
    try:
        job = await restore(api, wait_job, backup=name, into_database=hidden)
        assert job["status"] == "failed" and job["error"]["code"] == "database_exists", job
        assert job["error"]["database_state"] == "unchanged"
        assert await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", hidden)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{hidden}"')
        await admin.close()


async def test_one_table_beside_the_live_database(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter) -> None:
    """`tables` with `into_database`: a new database that holds just that table as it was
    backed up (its schema made for it), to compare or copy rows back; live untouched."""
    from tests.servers.test_restore_tables_pg import SCHEMA
    conn = await pg.user_conn(pg_db)
    await conn.execute(SCHEMA)
    await conn.close()
    name = (await backup(api))["result"]["filename"]
    backed_up = await pg.fingerprint(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("UPDATE app.customers SET name = 'oops'")
    await conn.close()
    live = await pg.fingerprint(pg_db)
    beside = f"{pg_db}_one"
    try:
        job = await restore(api, wait_job, backup=name, into_database=beside,
                            tables=["app.customers"])
        assert job["status"] == "succeeded", job["error"]["message"]
        copy = await pg.fingerprint(beside)
        assert copy["data"] == {"app.customers": backed_up["data"]["app.customers"]}
        assert await pg.fingerprint(pg_db) == live
    finally:
        await pg.drop_database(beside)
