"""Issue 21 (PostgreSQL): a restore gives the application its database back — owners,
table and column grants, default privileges and RLS policies — on the same server (as a
role that is not a superuser but a member of the owning role), and on a new server with an
explicit choice for the roles it lacks (`roles = "create" | "skip"`), never a failure
halfway."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from api.app import create_app
from shared.config import Settings, parse_settings
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import backup, restore, run_recipe, running_worker

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def roles_for(db: str) -> dict[str, str]:
    tag = db.rsplit("_", 1)[-1][:8]
    return {"owner": f"app_owner_{tag}", "readers": f"app_readers_{tag}",
            "reader": f"app_reader_{tag}"}


@pytest.fixture(autouse=True)
async def drop_roles(pg_db: str) -> AsyncIterator[None]:
    """The roles are the shared server's: gone after the test (with what they own here)."""
    yield
    r = roles_for(pg_db)
    admin = await pg.admin_conn(pg_db)
    try:
        existing = [x for x in r.values() if await admin.fetchval(
            "SELECT 1 FROM pg_roles WHERE rolname = $1", x)]
        await admin.execute("DROP SCHEMA IF EXISTS app CASCADE")
        for x in existing:
            with contextlib.suppress(asyncpg.PostgresError):
                await admin.execute(f"DROP OWNED BY {x} CASCADE")
        for x in existing:
            with contextlib.suppress(asyncpg.PostgresError):
                await admin.execute(f"DROP ROLE {x}")
    finally:
        await admin.close()


async def build(db: str) -> dict[str, str]:
    """The torture schema: `app` owned by the owner role, read by a reader through its
    membership in `readers`, a column grant, default privileges and an RLS policy."""
    r = roles_for(db)
    admin = await pg.admin_conn()
    try:
        for role in r.values():
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.execute(f"CREATE ROLE {r['owner']} NOLOGIN")
        await admin.execute(f"CREATE ROLE {r['readers']} NOLOGIN")
        await admin.execute(f"CREATE ROLE {r['reader']} LOGIN PASSWORD 'rd-pw' "
                            f"IN ROLE {r['readers']}")
        # Safehold's role is no superuser: a member of the owning role
        await admin.execute(f"GRANT {r['owner']} TO {pg.TEST_USER}")
    finally:
        await admin.close()
    conn = await pg.user_conn(db)
    try:
        await conn.execute(f"""
            CREATE SCHEMA app AUTHORIZATION {r['owner']};
            SET ROLE {r['owner']};
            CREATE TABLE app.orders (id int PRIMARY KEY, tenant text, total numeric);
            INSERT INTO app.orders SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, g
              FROM generate_series(1, 40) g;
            CREATE TABLE app.customers (id int PRIMARY KEY, name text, card text);
            INSERT INTO app.customers VALUES (1, 'ann', '4111-1111'), (2, 'bob', '5500-0000');
            GRANT USAGE ON SCHEMA app TO {r['readers']};
            GRANT SELECT ON app.orders TO {r['readers']};
            GRANT SELECT (id, name) ON app.customers TO {r['readers']};
            ALTER DEFAULT PRIVILEGES FOR ROLE {r['owner']} IN SCHEMA app
              GRANT SELECT ON TABLES TO {r['readers']};
            ALTER TABLE app.orders ENABLE ROW LEVEL SECURITY;
            CREATE POLICY tenant_a ON app.orders FOR SELECT TO {r['readers']}
              USING (tenant = 'a');
            RESET ROLE;""")
    finally:
        await conn.close()
    return r


ACL_FINGERPRINT = """
SELECT 'rel ' || c.relname || ' owner=' || pg_get_userbyid(c.relowner)
       || ' acl=' || coalesce(c.relacl::text, '-')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'app'
UNION ALL
SELECT 'col ' || c.relname || '.' || a.attname || ' acl=' || a.attacl::text
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = 'app' AND a.attacl IS NOT NULL
UNION ALL
SELECT 'schema owner=' || pg_get_userbyid(nspowner) || ' acl=' || coalesce(nspacl::text, '-')
  FROM pg_namespace WHERE nspname = 'app'
UNION ALL
SELECT 'default ' || pg_get_userbyid(defaclrole) || ' ' || defaclacl::text FROM pg_default_acl
UNION ALL
SELECT 'policy ' || polname || ' roles=' || (SELECT string_agg(rolname, ',' ORDER BY rolname)
  FROM pg_roles WHERE oid = ANY(polroles)) || ' ' || pg_get_expr(polqual, polrelid)
  FROM pg_policy
UNION ALL
SELECT 'rls ' || relname || '=' || relrowsecurity::text FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'app' AND c.relkind = 'r'
ORDER BY 1"""


async def acls(conn: asyncpg.Connection) -> list[str]:
    return [r[0] for r in await conn.fetch(ACL_FINGERPRINT)]


async def what_the_reader_sees(host: str, port: int, db: str, reader: str) -> dict[str, Any]:
    conn = await asyncpg.connect(host=host, port=port, user=reader, password="rd-pw",
                                 database=db)
    try:
        seen: dict[str, Any] = {
            "orders": await conn.fetchval("SELECT count(*) FROM app.orders"),
            "tenants": await conn.fetchval("SELECT string_agg(DISTINCT tenant, ',') "
                                           "FROM app.orders"),
            "names": await conn.fetchval("SELECT string_agg(name, ',' ORDER BY id) "
                                         "FROM app.customers")}
        try:
            await conn.fetchval("SELECT card FROM app.customers")
            seen["card"] = "readable"
        except asyncpg.InsufficientPrivilegeError:
            seen["card"] = "denied"
        return seen
    finally:
        await conn.close()


async def test_same_server_restore_brings_owners_and_grants_back(
        api: Any, worker: Any, pg_db: str) -> None:
    r = await build(pg_db)
    admin = await pg.admin_conn(pg_db)
    before = await acls(admin)
    seen_before = await what_the_reader_sees(pg.PG_HOST, pg.PG_PORT, pg_db, r["reader"])
    assert seen_before == {"orders": 20, "tenants": "a", "names": "ann,bob",
                           "card": "denied"}
    name = (await backup(api))["result"]["filename"]
    # the damage people make: grants revoked, an owner changed, a policy dropped
    await admin.execute(f"""
        REVOKE SELECT ON app.orders FROM {r['readers']};
        REVOKE SELECT (id, name) ON app.customers FROM {r['readers']};
        ALTER TABLE app.customers OWNER TO {pg.TEST_USER};
        DROP POLICY tenant_a ON app.orders;
        ALTER DEFAULT PRIVILEGES FOR ROLE {r['owner']} IN SCHEMA app
          REVOKE SELECT ON TABLES FROM {r['readers']};""")
    assert await acls(admin) != before
    for _ in range(2):  # over the live database, twice
        job = await restore(api, name)
        assert job["status"] == "succeeded", job
        assert await acls(admin) == before
    await admin.close()
    assert await what_the_reader_sees(pg.PG_HOST, pg.PG_PORT, pg_db, r["reader"]) == \
        seen_before


# ------------------------------------------------------------------ a new server
@pytest.fixture
async def fresh_server() -> AsyncIterator[int]:
    """A private PostgreSQL cluster (initdb on a free port): a server without the roles."""
    async with pg.private_cluster() as port:
        yield port


def two_targets(prefix: str, tmp_path: Path, pg_db: str, port: int,
                test_env: dict[str, str]) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["fresh"] = {"engine": "postgresql",
                               "url": f"postgresql://postgres@127.0.0.1:{port}/app"}
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


def carry_to_fresh(tmp_path: Path, filename: str) -> None:
    """The disaster: the backup (file and manifest) is all there is, on the new server's
    side of the storage."""
    src, dst = tmp_path / "backups" / "main", tmp_path / "backups" / "fresh"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (filename, f"{filename}.json"):
        shutil.copy2(src / f, dst / f)


async def test_a_new_server_needs_a_choice_for_its_missing_roles(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], fresh_server: int) -> None:
    r = await build(pg_db)
    admin = await pg.admin_conn(pg_db)
    before = await acls(admin)
    await admin.close()
    seen_before = await what_the_reader_sees(pg.PG_HOST, pg.PG_PORT, pg_db, r["reader"])
    settings = two_targets(prefix, tmp_path, pg_db, fresh_server, test_env)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        made = (await backup(api))["result"]
        manifest = await (await api.get(
            f"/api/v1/targets/main/backups/{made['filename']}")).json()
        assert {r["owner"], r["readers"]} <= set(manifest["roles"]), manifest["roles"]
        carry_to_fresh(tmp_path, made["filename"])
        refused = await restore(api, made["filename"], target="fresh")
        assert refused["status"] == "failed", refused
        assert refused["error"]["code"] == "roles_missing", refused["error"]
        assert refused["error"]["database_state"] == "unchanged"
        assert r["owner"] in refused["error"]["message"] and "roles" in \
            refused["error"]["message"]
        job = await restore(api, made["filename"], target="fresh", roles="create",
                            create_safety_backup=False)
        assert job["status"] == "succeeded", job
        assert any("created" in w for w in job["result"]["warnings"] or []), job
        new = await asyncpg.connect(host="127.0.0.1", port=fresh_server, user="postgres",
                                    database="app")
        try:
            assert await acls(new) == before  # owners, grants, defaults, policies
            login = await new.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
                                       r["readers"])
            assert login is False  # created NOLOGIN, without a password
            # the application's login role: memberships come with the server's globals
            # (not part of a database's backup), so here the operator adds it
            await new.execute(f"CREATE ROLE {r['reader']} LOGIN PASSWORD 'rd-pw' "
                              f"IN ROLE {r['readers']}")
        finally:
            await new.close()
        assert await what_the_reader_sees("127.0.0.1", fresh_server, "app",
                                          r["reader"]) == seen_before


async def test_skip_leaves_owners_and_grants_out_and_says_which(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], fresh_server: int) -> None:
    r = await build(pg_db)
    # a policy names a role: with skip, the policy's role must exist; here it is dropped
    conn = await pg.user_conn(pg_db)
    await conn.execute(f"SET ROLE {r['owner']}; DROP POLICY tenant_a ON app.orders")
    await conn.close()
    settings = two_targets(prefix, tmp_path, pg_db, fresh_server, test_env)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        made = (await backup(api))["result"]
        carry_to_fresh(tmp_path, made["filename"])
        job = await restore(api, made["filename"], target="fresh", roles="skip",
                            create_safety_backup=False)
    assert job["status"] == "succeeded", job
    warning = " ".join(job["result"]["warnings"] or [])
    assert "left out" in warning and f"OWNER TO {r['owner']}" in warning
    assert f"TO {r['readers']}" in warning
    new = await asyncpg.connect(host="127.0.0.1", port=fresh_server, user="postgres",
                                database="app")
    try:
        owners = {row[0] for row in await new.fetch(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = 'app'")}
        assert owners == {"postgres"}
        assert await new.fetchval("SELECT count(*) FROM app.orders") == 40
    finally:
        await new.close()


async def test_roles_is_checked(api: Any) -> None:
    resp = await api.post("/api/v1/targets/main/restores", json={
        "backup": "backup_postgresql_20240101_000000.sql.gz", "roles": "maybe"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_body"


async def test_map_gives_the_backups_objects_to_the_new_servers_roles(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], fresh_server: int) -> None:
    """`roles = "map"` with `owner_map`: owners, grants, default privileges and policy roles
    are renamed to roles the new server already has; a map that leaves a missing role out,
    or names a role that does not exist, is refused before anything changes."""
    r = await build(pg_db)
    admin = await pg.admin_conn(pg_db)
    before = await acls(admin)
    await admin.close()
    settings = two_targets(prefix, tmp_path, pg_db, fresh_server, test_env)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    new = await asyncpg.connect(host="127.0.0.1", port=fresh_server, user="postgres",
                                database="app")
    await new.execute("CREATE ROLE owner2 NOLOGIN; CREATE ROLE readers2 NOLOGIN; "
                      "CREATE ROLE reader2 LOGIN PASSWORD 'rd-pw' IN ROLE readers2")
    try:
        async with running_worker(settings):
            made = (await backup(api))["result"]
            carry_to_fresh(tmp_path, made["filename"])
            for bad_map, why in (({r["owner"]: "owner2"}, r["readers"]),
                                 ({r["owner"]: "owner2", r["readers"]: "nobody9"},
                                  "nobody9")):
                refused = await restore(api, made["filename"], target="fresh",
                                        roles="map", owner_map=bad_map,
                                        create_safety_backup=False)
                assert refused["error"]["code"] == "roles_missing", refused["error"]
                assert why in refused["error"]["message"]
                assert refused["error"]["database_state"] == "unchanged"
            job = await restore(api, made["filename"], target="fresh", roles="map",
                                owner_map={r["owner"]: "owner2", r["readers"]: "readers2"},
                                create_safety_backup=False)
            assert job["status"] == "succeeded", job
        renamed = [line.replace(r["owner"], "owner2").replace(r["readers"], "readers2")
                   for line in before]
        assert await acls(new) == sorted(renamed) or await acls(new) == renamed
    finally:
        await new.close()
    assert await what_the_reader_sees("127.0.0.1", fresh_server, "app", "reader2") == {
        "orders": 20, "tenants": "a", "names": "ann,bob", "card": "denied"}
    resp = await api.post("/api/v1/targets/main/restores", json={
        "backup": made["filename"], "roles": "map"})  # a map is needed
    assert resp.status == 400


# ------------------------------------------------------------------ the server's globals
async def password_hash(host: str, port: int, role: str, db: str = "postgres") -> Any:
    conn = await asyncpg.connect(host=host, port=port, user="postgres", database=db)
    try:
        return await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                                   role)
    finally:
        await conn.close()


@pytest.mark.parametrize("connect_as", ["member", "superuser"])
async def test_globals_bring_the_application_roles_to_a_new_server(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], fresh_server: int, connect_as: str) -> None:
    """`globals = true`: the backup carries pg_dumpall --globals-only; `roles = "create"` on
    a new server creates the roles the database needs — the owners and grantees, and the
    application's login role that is only a member of one — with LOGIN, settings,
    memberships, and their passwords when the backup's role could read them."""
    r = await build(pg_db)
    admin = await pg.admin_conn(pg_db)
    await admin.execute(f"ALTER ROLE {r['reader']} SET search_path TO app, public; "
                        f"ALTER ROLE {r['reader']} WITH CONNECTION LIMIT 7; "
                        f"COMMENT ON ROLE {r['reader']} IS 'the app''s reader'; "
                        f"ALTER ROLE {r['readers']} WITH BYPASSRLS")
    before = await acls(admin)
    await admin.close()
    seen_before = await what_the_reader_sees(pg.PG_HOST, pg.PG_PORT, pg_db, r["reader"])
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["globals"] = True
    if connect_as == "superuser":
        raw["targets"]["main"]["url"] = f"postgresql://postgres@{pg.PG_HOST}:{pg.PG_PORT}/{pg_db}"
    raw["targets"]["fresh"] = {"engine": "postgresql",
                               "url": f"postgresql://postgres@127.0.0.1:{fresh_server}/app"}
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        made = (await backup(api))["result"]
        manifest = await (await api.get(
            f"/api/v1/targets/main/backups/{made['filename']}")).json()
        assert manifest["globals"] == {"tool": "pg_dumpall --globals-only",
                                       "role_passwords": connect_as == "superuser"}
        carry_to_fresh(tmp_path, made["filename"])
        job = await restore(api, made["filename"], target="fresh", roles="create",
                            create_safety_backup=False)
    assert job["status"] == "succeeded", job
    warnings = " ".join(job["result"]["warnings"] or [])
    assert r["reader"] in warnings and "as the backup's globals describe them" in warnings
    assert f"BYPASSRLS not given to {r['readers']}" in warnings, warnings
    new = await asyncpg.connect(host="127.0.0.1", port=fresh_server, user="postgres",
                                database="app")
    try:
        assert await acls(new) == before
        reader = await new.fetchrow(
            "SELECT rolcanlogin, rolconnlimit, rolbypassrls, rolsuper, "
            "shobj_description(oid, 'pg_authid') AS comment FROM pg_roles "
            "WHERE rolname = $1", r["reader"])
        assert dict(reader) == {"rolcanlogin": True, "rolconnlimit": 7,
                                "rolbypassrls": False, "rolsuper": False,
                                "comment": "the app's reader"}
        assert not await new.fetchval("SELECT rolbypassrls FROM pg_roles WHERE rolname = $1",
                                      r["readers"])
        settings_row = await new.fetchval(
            "SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = "
            "s.setrole WHERE r.rolname = $1", r["reader"])
        assert settings_row == ["search_path=app, public"]
        assert await new.fetchval(
            "SELECT pg_has_role($1, $2, 'MEMBER')", r["reader"], r["readers"])
        # roles of the old server that do not reach this database are not brought
        assert not await new.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'root'")
    finally:
        await new.close()
    if connect_as == "superuser":  # the password came with the backup
        assert await password_hash("127.0.0.1", fresh_server, r["reader"]) == \
            await password_hash(pg.PG_HOST, pg.PG_PORT, r["reader"])
    else:  # --no-role-passwords: the operator sets it again
        assert await password_hash("127.0.0.1", fresh_server, r["reader"]) is None
    assert await what_the_reader_sees("127.0.0.1", fresh_server, "app",
                                      r["reader"]) == seen_before


async def test_globals_by_hand_on_a_new_server(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], fresh_server: int) -> None:
    """The README's recipe for a new server, run as pasted with stock gunzip, awk and
    psql: the globals first, then the database; the application's reader reads what it
    did, owners and grants are the backup's."""
    from tests.support.recipes import fill, recipes

    r = await build(pg_db)
    admin = await pg.admin_conn(pg_db)
    before = await acls(admin)
    await admin.close()
    seen_before = await what_the_reader_sees(pg.PG_HOST, pg.PG_PORT, pg_db, r["reader"])
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["globals"] = True
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        name = (await backup(api))["result"]["filename"]
    work = tmp_path / "by-hand"
    work.mkdir()
    shutil.copy2(tmp_path / "backups" / "main" / name, work / name)
    out = await run_recipe(fill(recipes()[2], F=name, DB="restored"), work, {
        **os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(fresh_server),
        "PGUSER": "postgres"})
    assert "ERROR" not in out, out
    new = await asyncpg.connect(host="127.0.0.1", port=fresh_server, user="postgres",
                                database="restored")
    try:
        assert await acls(new) == before
        assert await new.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
                                  r["reader"])
    finally:
        await new.close()
    assert await what_the_reader_sees("127.0.0.1", fresh_server, "restored",
                                      r["reader"]) == seen_before
