"""Issue 21: server targets — `databases = "*"` (or a list, less `exclude`) backs up every
database of a PostgreSQL or MySQL/MariaDB server as one backup set: listed as one backup
with its members, picked up as databases appear, restored whole or one member (the others
untouched), drilled member by member, restored onto a new server; the set's file is
untrusted input like any backup."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Any

import asyncpg

from api.app import create_app
from shared import backup_sets
from shared.config import parse_settings
from tests import my, pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import readme_blocks, restore, run_recipe, running_worker

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, {n}) g;
"""


async def pg_fingerprint(port: int, db: str) -> dict[str, Any]:
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=db)
    try:
        out: dict[str, Any] = {}
        for (table,) in await conn.fetch(
                "SELECT quote_ident(relname) FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND relkind = 'r' "
                "ORDER BY 1"):
            out[table] = await conn.fetchval(
                f"SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' "
                f"ORDER BY x::text)), '') FROM {table} x")
        return out
    finally:
        await conn.close()


async def pg_exec(port: int, db: str, sql: str) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=db)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def server_settings(prefix: str, tmp_path: Path, port: int, **extra: Any) -> Any:
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"srv": {"engine": "postgresql", "databases": "*", "exclude": ["app"],
                              "url": f"postgresql://postgres@127.0.0.1:{port}/postgres"},
                      **extra}
    raw["default_target"] = "srv"
    return parse_settings(raw, {}, base=tmp_path, source="<test>")


async def backup_of(api: Any, target: str = "srv") -> dict[str, Any]:
    job = await (await api.post(f"/api/v1/targets/{target}/backups?wait=120")).json()
    assert job["status"] == "succeeded", job
    return dict(job["result"])


async def test_a_postgresql_server_is_one_set(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path) -> None:
    async with pg.private_cluster(("app", "db1", "db2")) as port:
        await pg_exec(port, "db1", SCHEMA.format(n=30))
        await pg_exec(port, "db2", SCHEMA.format(n=50) + "CREATE TABLE only_b (x int);"
                      "INSERT INTO only_b VALUES (1), (2);")
        settings = server_settings(prefix, tmp_path, port)
        api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
        async with running_worker(settings):
            first = await backup_of(api)
            manifest = await (await api.get(
                f"/api/v1/targets/srv/backups/{first['filename']}")).json()
            assert [m["database"] for m in manifest["set"]["members"]] == [
                "db1", "db2", "postgres"]  # "app" excluded
            # a database created since: in the next set, no config change
            await pg_exec(port, "postgres", "CREATE DATABASE db3")
            await pg_exec(port, "db3", SCHEMA.format(n=7))
            made = await backup_of(api)
            listed = await (await api.get("/api/v1/targets/srv/backups")).json()
            assert [b["filename"] for b in listed["backups"]] == [
                made["filename"], first["filename"]]  # a set is one backup
            assert listed["backups"][0]["databases"] == ["db1", "db2", "db3", "postgres"]
            manifest = await (await api.get(
                f"/api/v1/targets/srv/backups/{made['filename']}")).json()
            members = {m["database"]: m for m in manifest["set"]["members"]}
            assert sorted(members) == ["db1", "db2", "db3", "postgres"]
            assert members["db2"]["exact_counts"] == {"public.t": 50, "public.only_b": 2}
            assert members["db3"]["exact_counts"] == {"public.t": 7}
            before = {db: await pg_fingerprint(port, db) for db in ("db1", "db2", "db3")}
            stats = await (await api.get("/api/v1/targets/srv/stats")).json()
            assert [d["database"] for d in stats["databases"]] == [
                "db1", "db2", "db3", "postgres"], stats

            # the damage: in all three
            await pg_exec(port, "db1", "DROP TABLE t")
            await pg_exec(port, "db2", "INSERT INTO t VALUES (999, 'x')")
            await pg_exec(port, "db3", "DELETE FROM t")
            damaged = {db: await pg_fingerprint(port, db) for db in ("db1", "db2", "db3")}
            # one member: db2 only, the other two untouched
            job = await restore(api, made["filename"], target="srv", database="db2")
            assert job["status"] == "succeeded", job
            assert await pg_fingerprint(port, "db2") == before["db2"]
            assert await pg_fingerprint(port, "db1") == damaged["db1"]
            assert await pg_fingerprint(port, "db3") == damaged["db3"]
            # the whole set, twice
            for _ in range(2):
                job = await restore(api, made["filename"], target="srv")
                assert job["status"] == "succeeded", job
                assert {db: await pg_fingerprint(port, db)
                        for db in ("db1", "db2", "db3")} == before
            # a database the set does not hold: refused before anything runs
            resp = await api.post("/api/v1/targets/srv/restores", json={
                "backup": made["filename"], "database": "nope"})
            assert resp.status == 404, await resp.text()
            assert (await resp.json())["error"]["code"] == "database_missing"
            # a drill restores every member into its own scratch copy and counts it
            drill = await (await api.post("/api/v1/targets/srv/verify?wait=120",
                                          json={"backup": made["filename"]})).json()
            assert drill["status"] == "succeeded", drill
            assert drill["result"]["databases"] == 4, drill["result"]
            assert drill["result"]["counts_compared"] == 4  # t, t, only_b, t
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres")
            try:
                left = await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname "
                                           "LIKE 'safehold_drill_%'")
            finally:
                await conn.close()
            assert left == 0

        # a new server: the databases are created, then loaded
        async with pg.private_cluster(()) as new_port:
            raw_new = {"engine": "postgresql", "databases": "*",
                       "url": f"postgresql://postgres@127.0.0.1:{new_port}/postgres"}
            settings2 = server_settings(prefix, tmp_path, port, fresh=raw_new)
            api2 = await aiohttp_client(create_app(settings2),
                                        headers=bearer(settings2, "admin"))
            dst = tmp_path / "backups" / "fresh"
            dst.mkdir(parents=True, exist_ok=True)
            for f in (made["filename"], f"{made['filename']}.json"):
                shutil.copy2(tmp_path / "backups" / "srv" / f, dst / f)
            async with running_worker(settings2):
                job = await restore(api2, made["filename"], target="fresh",
                                    create_safety_backup=False)
            assert job["status"] == "succeeded", job
            assert {db: await pg_fingerprint(new_port, db)
                    for db in ("db1", "db2", "db3")} == before


async def test_a_mysql_server_list_is_one_set(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path) -> None:
    names = [await my.create_database() for _ in range(3)]
    try:
        conn = await my.admin()
        try:
            for n, db in enumerate(names):
                await my.execute(conn, f"CREATE TABLE `{db}`.t (id INT PRIMARY KEY, v TEXT)",
                                 *[f"INSERT INTO `{db}`.t VALUES ({i}, 'v{i}')"
                                   for i in range(n * 5 + 3)])
        finally:
            conn.close()
        raw = make_raw_config(prefix, tmp_path / "backups", None)
        raw["targets"] = {"srv": {"engine": "mysql", "databases": names[:2],
                                  "url": f"mysql://root@{my.HOST}:{my.PORT}/"}}
        raw["default_target"] = "srv"
        settings = parse_settings(raw, {}, base=tmp_path, source="<test>")
        api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
        async with running_worker(settings):
            made = await backup_of(api)
            manifest = await (await api.get(
                f"/api/v1/targets/srv/backups/{made['filename']}")).json()
            assert [m["database"] for m in manifest["set"]["members"]] == names[:2]
            before = {db: await my.fingerprint(db) for db in names}
            conn = await my.admin()
            try:
                await my.execute(conn, f"DROP TABLE `{names[0]}`.t",
                                 f"DELETE FROM `{names[1]}`.t",
                                 f"DELETE FROM `{names[2]}`.t")
            finally:
                conn.close()
            untouched = await my.fingerprint(names[2])
            job = await restore(api, made["filename"], target="srv", database=names[1])
            assert job["status"] == "succeeded", job
            assert await my.fingerprint(names[1]) == before[names[1]]
            assert await my.fingerprint(names[0]) != before[names[0]]
            job = await restore(api, made["filename"], target="srv")
            assert job["status"] == "succeeded", job
            for db in names[:2]:
                assert await my.fingerprint(db) == before[db]
            assert await my.fingerprint(names[2]) == untouched  # never in the set
            drill = await (await api.post("/api/v1/targets/srv/verify?wait=120",
                                          json={})).json()
            assert drill["status"] == "succeeded", drill
            assert drill["result"]["databases"] == 2
    finally:
        for db in names:
            await my.drop_database(db)


# ------------------------------------------------------------------ the file is untrusted


async def test_a_forged_set_changes_nothing(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path) -> None:
    """A set whose member holds what a database's dump never does is refused by that
    member's check before the first member loads: the earlier members are unchanged."""
    async with pg.private_cluster(("app", "db1", "db2")) as port:
        await pg_exec(port, "db1", SCHEMA.format(n=5))
        await pg_exec(port, "db2", SCHEMA.format(n=5))
        settings = server_settings(prefix, tmp_path, port)
        api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
        storage = tmp_path / "backups" / "srv"
        async with running_worker(settings):
            made = await backup_of(api)
            manifest = json.loads((storage / f"{made['filename']}.json").read_text())
            plain = gzip.decompress((storage / made["filename"]).read_bytes())
            token = manifest["set"]["token"]
            # the second member gets a shell escape
            forged = plain.replace(backup_sets.member_line(token, "db2"),
                                   backup_sets.member_line(token, "db2")
                                   + b"\\! touch /tmp/safehold-forged\n")
            await pg_exec(port, "db1", "INSERT INTO t VALUES (100, 'after')")
            before = await pg_fingerprint(port, "db1")
            name = "backup_postgresql_20200101_000000.sql.gz"
            from tests.helpers import publish_plain

            await publish_plain(storage, name, forged, manifest)
            job = await restore(api, name, target="srv")
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "unsafe_backup", job["error"]
        assert job["error"]["database_state"] == "unchanged", job["error"]
        assert await pg_fingerprint(port, "db1") == before
        assert not Path("/tmp/safehold-forged").exists()


async def test_a_set_by_hand_on_a_new_server(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path) -> None:
    """The README's recipe, as pasted (jq, gunzip, awk, psql, createdb): a set split into
    one file per database and loaded on a new cluster, the roles first."""
    from tests.support.recipes import fill

    async with pg.private_cluster(("app", "db1", "db2")) as port:
        await pg_exec(port, "postgres", "CREATE ROLE app_owner NOLOGIN")
        await pg_exec(port, "db1", SCHEMA.format(n=12) + "ALTER TABLE t OWNER TO app_owner;")
        await pg_exec(port, "db2", SCHEMA.format(n=21))
        before = {db: await pg_fingerprint(port, db) for db in ("db1", "db2")}
        settings = server_settings(prefix, tmp_path, port)
        api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
        async with running_worker(settings):
            name = (await backup_of(api))["filename"]
        work = tmp_path / "by-hand"
        work.mkdir()
        for f in (name, f"{name}.json"):
            shutil.copy2(tmp_path / "backups" / "srv" / f, work / f)
        async with pg.private_cluster(()) as new_port:
            [recipe] = readme_blocks("Server targets")
            out = await run_recipe(fill(recipe, F=name), work, {
                **os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(new_port),
                "PGUSER": "postgres"})
            assert "ERROR" not in out, out
            assert {db: await pg_fingerprint(new_port, db) for db in ("db1", "db2")} == before
            conn = await asyncpg.connect(host="127.0.0.1", port=new_port, user="postgres",
                                         database="db1")
            try:
                assert await conn.fetchval("SELECT pg_get_userbyid(relowner) FROM pg_class "
                                           "WHERE relname = 't'") == "app_owner"
            finally:
                await conn.close()


async def test_a_set_writes_only_what_its_target_may(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path) -> None:
    """Refused before anything changes: a member this target may not write (a template, a
    database outside its list), a file and manifest that disagree on the databases, a set
    onto a one-database target, and a member whose roles the server lacks when no choice
    was made (found before the first member loads)."""
    async with pg.private_cluster(("app", "db1", "db2")) as port:
        await pg_exec(port, "db1", SCHEMA.format(n=5))
        await pg_exec(port, "db2", SCHEMA.format(n=5))
        one = {"engine": "postgresql", "url": f"postgresql://postgres@127.0.0.1:{port}/db1"}
        settings = server_settings(prefix, tmp_path, port, one=one)
        api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
        storage = tmp_path / "backups" / "srv"
        async with running_worker(settings):
            made = await backup_of(api)
            manifest = json.loads((storage / f"{made['filename']}.json").read_text())
            plain = gzip.decompress((storage / made["filename"]).read_bytes())
            token = manifest["set"]["token"]
            await pg_exec(port, "db1", "INSERT INTO t VALUES (100, 'after')")
            before = {db: await pg_fingerprint(port, db) for db in ("db1", "db2")}

            def renamed(blob: bytes, old: str, new: str) -> bytes:
                return blob.replace(backup_sets.member_line(token, old),
                                    backup_sets.member_line(token, new))

            def listed(m: dict[str, Any], old: str, new: str, **extra: Any) -> dict[str, Any]:
                members = [{**x, "database": new, **extra} if x["database"] == old else x
                           for x in m["set"]["members"]]
                return {**m, "set": {**m["set"], "members": members}}
            cases = {
                "database_refused": (renamed(plain, "db2", "template1"),
                                     listed(manifest, "db2", "template1")),
                "corrupt_backup": (renamed(plain, "db2", "app"), manifest),
                "roles_missing": (plain, listed(manifest, "db2", "db2",
                                                roles=["postgres", "nobody_here"])),
            }
            for n, (code, (blob, m)) in enumerate(cases.items()):
                name = f"backup_postgresql_2020010{n + 1}_000000.sql.gz"
                from tests.helpers import publish_plain

                await publish_plain(storage, name, blob, m)
                job = await restore(api, name, target="srv")
                assert job["status"] == "failed", (code, job)
                assert job["error"]["code"] == code, (code, job["error"])
                assert job["error"]["database_state"] == "unchanged", job["error"]
                assert {db: await pg_fingerprint(port, db) for db in ("db1", "db2")} == before
            # a set onto a one-database target
            dst = tmp_path / "backups" / "one"
            dst.mkdir(parents=True, exist_ok=True)
            for f in (made["filename"], f"{made['filename']}.json"):
                shutil.copy2(storage / f, dst / f)
            job = await restore(api, made["filename"], target="one")
            assert job["error"]["code"] == "engine_mismatch", job["error"]
            assert job["error"]["database_state"] == "unchanged"
            assert {db: await pg_fingerprint(port, db) for db in ("db1", "db2")} == before
