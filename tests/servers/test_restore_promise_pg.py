"""PostgreSQL: whatever state the target is in, a restore of a good backup brings it to
exactly the backup's state (over the live database, twice, after real damage, with objects
that live outside schemas), or fails saying the database is unchanged."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from shared.config import Settings, parse_settings
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import backup, stored_bytes, wait_for_terminal

# Everything a plain pg_dump holds that DROP SCHEMA … CASCADE does not reach, plus ordinary
# objects depending on them (needs a superuser target: event triggers, subscriptions, FDWs).
TORTURE = r"""
CREATE SCHEMA ext;
CREATE EXTENSION hstore SCHEMA ext;
CREATE EXTENSION postgres_fdw;
CREATE SERVER remote FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', dbname 'nowhere');
CREATE USER MAPPING FOR CURRENT_USER SERVER remote OPTIONS (user 'nobody');
CREATE FOREIGN TABLE remote_things (id int) SERVER remote OPTIONS (table_name 'things');
CREATE FOREIGN DATA WRAPPER plain_fdw;
CREATE SERVER plain_srv FOREIGN DATA WRAPPER plain_fdw;
CREATE TABLE docs (id int PRIMARY KEY, body text, tags ext.hstore);
INSERT INTO docs SELECT g, 'doc ' || g || E'\n\\restrict x', ('k=>' || g)::ext.hstore
FROM generate_series(1, 500) g;
CREATE VIEW doc_view AS SELECT id, body FROM docs;
CREATE VIEW doc_view2 AS SELECT id FROM doc_view WHERE id % 2 = 0;
SELECT lo_from_bytea(0, convert_to('large object one', 'UTF8'));
SELECT lo_from_bytea(0, decode(repeat('00ff', 50000), 'hex'));
CREATE PUBLICATION docs_pub FOR TABLE docs;
CREATE SUBSCRIPTION docs_sub CONNECTION 'host=127.0.0.1 dbname=nowhere'
  PUBLICATION docs_pub WITH (connect = false);
CREATE FUNCTION note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
  -- a line that starts with a backslash inside a function body is not a meta-command:
  PERFORM 'x
\! not a command';
END $$;
CREATE EVENT TRIGGER ddl_note ON ddl_command_end EXECUTE FUNCTION note_ddl();
CREATE TYPE pair AS (a int, b int);
CREATE FUNCTION pair_text(pair) RETURNS text LANGUAGE sql IMMUTABLE
  AS $$ SELECT $1.a || ',' || $1.b $$;
CREATE CAST (pair AS text) WITH FUNCTION pair_text(pair);
CREATE FUNCTION atomic_count() RETURNS bigint LANGUAGE sql
BEGIN ATOMIC
  SELECT count(*) FROM docs WHERE CASE WHEN id > 0 THEN true ELSE false END;
  SELECT count(*) FROM docs;
END;
CREATE ACCESS METHOD heap2 TYPE TABLE HANDLER heap_tableam_handler;
CREATE TABLE on_heap2 (x int) USING heap2;
INSERT INTO on_heap2 VALUES (1), (2);
"""


@pytest.fixture
def settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str]) -> Settings:
    """The target connects as the superuser (trust auth): the torture objects need it."""
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"] = {"engine": "postgresql",
                              "url": f"postgresql://{pg.ADMIN_USER}@{pg.PG_HOST}:{pg.PG_PORT}"
                                     f"/{pg_db}"}
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


async def admin_exec(db: str, sql: str) -> None:
    conn = await pg.admin_conn(db)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def restore(api: Any, name: str, **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/v1/targets/main/restores", json={"backup": name, **body})
    assert resp.status == 202, await resp.text()
    return await wait_for_terminal(api, (await resp.json())["id"])


async def test_torture_restore_over_live_database_twice_and_after_damage(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    await admin_exec(pg_db, TORTURE)
    before = await pg.fingerprint(pg_db)
    assert len(before["large_objects"]) == 2
    name = (await backup(api))["result"]["filename"]

    for attempt in (1, 2):  # the most common restore there is: over the untouched database
        job = await restore(api, name)
        assert job["status"] == "succeeded", (attempt, job["error"])
        assert await pg.fingerprint(pg_db) == before, attempt
    warnings = job["result"]["warnings"]
    assert warnings and "subscription" in warnings[0] and "DISABLED" in warnings[0]

    # the damage people really make, and objects created after the backup
    await admin_exec(pg_db, """
        DROP TABLE docs CASCADE;
        SELECT lo_from_bytea(0, 'made after the backup');
        CREATE PUBLICATION later_pub FOR ALL TABLES;
        CREATE SCHEMA junk; CREATE TABLE junk.t (x int);
        CREATE EXTENSION citext;
        CREATE EVENT TRIGGER later_trigger ON ddl_command_start EXECUTE FUNCTION note_ddl();
        DROP CAST (pair AS text);
    """)
    assert await pg.fingerprint(pg_db) != before
    job = await restore(api, name)
    assert job["status"] == "succeeded", job["error"]
    assert await pg.fingerprint(pg_db) == before
    conn = await pg.admin_conn(pg_db)
    try:
        enabled = await conn.fetchval("SELECT subenabled FROM pg_subscription "
                                      "WHERE subname = 'docs_sub'")
    finally:
        await conn.close()
    assert enabled is False  # never left enabled against a live publisher


async def test_torture_backup_restores_by_hand_into_an_empty_database(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """The backup stays a plain pg_dump: `gunzip | psql` loads it into an empty database."""
    await admin_exec(pg_db, TORTURE)
    before = await pg.fingerprint(pg_db)
    name = (await backup(api))["result"]["filename"]
    other = await pg.create_database("byhand")
    try:
        proc = await asyncio.create_subprocess_exec(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", pg.PG_HOST, "-p",
            str(pg.PG_PORT), "-U", pg.ADMIN_USER, other, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate(gzip.decompress(await stored_bytes(storage_dir, name)))
        assert proc.returncode == 0, err.decode()
        assert await pg.fingerprint(other) == before
    finally:
        await pg.drop_database(other)


async def test_seed_workflow_restores_large_objects_over_the_live_database(
        aiohttp_client: Any, prefix: str, tmp_path: Path, pg_db: str, worker: Any,
        test_env: dict[str, str]) -> None:
    """The seed's create → restore with a large object still present (the owner role,
    not a superuser)."""
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    user_settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    client = await aiohttp_client(create_app(user_settings),
                                  headers=bearer(user_settings, "admin"))
    await pg.load_rich(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("SELECT lo_from_bytea(0, 'a large object')")
    await conn.close()
    before = await pg.fingerprint(pg_db)
    created = await (await client.post("/backup/create")).json()
    assert created["success"], created
    for _ in range(2):
        resp = await client.post(f"/backup/restore/{created['filename']}")
        body = await resp.json()
        assert resp.status == 200 and body["success"], body
        assert await pg.fingerprint(pg_db) == before


async def test_failed_restore_names_line_and_leaves_database_unchanged(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """An SQL error late in the file: psql's line number is the file's, nothing changed."""
    await admin_exec(pg_db, TORTURE)
    name = (await backup(api))["result"]["filename"]
    plain = gzip.decompress(await stored_bytes(storage_dir, name))
    broken = plain.replace(b"CREATE VIEW public.doc_view2",
                           b"CREATE VIEW public.doc_view2_broken AS SELECT nope;\n"
                           b"CREATE VIEW public.doc_view2")
    line = broken[:broken.index(b"doc_view2_broken")].count(b"\n") + 1
    from tests.helpers import publish_plain

    manifest = dict(__import__("json").loads((storage_dir / f"{name}.json").read_text()))
    bad = name.replace("backup_", "upload_")
    await publish_plain(storage_dir, bad, broken, manifest)
    await admin_exec(pg_db, "DELETE FROM docs WHERE id > 400")
    damaged = await pg.fingerprint(pg_db)
    job = await restore(api, bad)
    assert job["status"] == "failed"
    assert job["error"]["database_state"] == "unchanged", job["error"]
    assert f"line {line}:" in job["error"]["message"], job["error"]["message"]
    assert await pg.fingerprint(pg_db) == damaged
