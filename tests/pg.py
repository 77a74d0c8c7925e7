"""PostgreSQL helpers for tests: fresh databases, a rich fixture schema, a canonical fingerprint."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

PG_HOST = os.environ.get("SAFEHOLD_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SAFEHOLD_TEST_PGPORT", "5432"))
ADMIN_USER = os.environ.get("SAFEHOLD_TEST_PGUSER", "postgres")
TEST_USER = "safehold_test"
TEST_PASSWORD = "S3cret-Test-Pw-7f2a"  # tests grep every output for this string


async def admin_conn(database: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=ADMIN_USER, database=database)


async def ensure_test_role() -> None:
    conn = await admin_conn()
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", TEST_USER)
        if not exists:
            try:
                await conn.execute(f"CREATE ROLE {TEST_USER} LOGIN PASSWORD '{TEST_PASSWORD}'")
            except asyncpg.DuplicateObjectError:
                pass
        await conn.execute(f"ALTER ROLE {TEST_USER} LOGIN PASSWORD '{TEST_PASSWORD}'")
    finally:
        await conn.close()


async def create_database(prefix: str = "sh") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await admin_conn()
    try:
        await conn.execute(f'CREATE DATABASE "{name}" OWNER {TEST_USER}')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    """Drop a test database (detaching any subscription first: they block DROP DATABASE)."""
    try:
        db = await admin_conn(name)
    except asyncpg.InvalidCatalogNameError:
        return
    try:
        for (sub,) in await db.fetch("SELECT quote_ident(subname) FROM pg_subscription "
                                     "WHERE subdbid = (SELECT oid FROM pg_database "
                                     "WHERE datname = current_database())"):
            await db.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
            await db.execute(f"ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)")
            await db.execute(f"DROP SUBSCRIPTION {sub}")
    finally:
        await db.close()
    conn = await admin_conn()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def user_conn(database: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=TEST_USER,
                                 password=TEST_PASSWORD, database=database)


RICH_SCHEMA = r"""
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'ünïcödé');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE SEQUENCE odd_seq INCREMENT BY 7 MINVALUE -1000 MAXVALUE 9000000000 START WITH -990 CYCLE;
SELECT setval('odd_seq', 123456789, true);
CREATE SCHEMA "Ärger";
CREATE TABLE "Ärger"."Straße" (id serial PRIMARY KEY, "naïve" text NOT NULL);
INSERT INTO "Ärger"."Straße" ("naïve") VALUES ('größer'), ('日本語テキスト'), ('emoji 🎉'), ('tab	and "quotes" and \backslash');
CREATE TABLE everything (
    id bigserial PRIMARY KEY,
    ints integer[] ,
    texts text[],
    doc jsonb,
    raw bytea,
    m mood,
    p positive_int,
    n numeric(30, 10),
    big_n numeric,
    ts timestamptz,
    t timestamp,
    d date,
    iv interval,
    u uuid,
    inet_v inet,
    r float8,
    flag boolean,
    total numeric GENERATED ALWAYS AS (n * 2) STORED
);
INSERT INTO everything (ints, texts, doc, raw, m, p, n, big_n, ts, t, d, iv, u, inet_v, r, flag)
SELECT ARRAY[g, -g, NULL], ARRAY['a,b', 'c"d', NULL, 'é'],
       jsonb_build_object('g', g, 'nested', jsonb_build_array(1, 'two', NULL, true), 'ü', 'x'),
       decode('00ff00' || lpad(to_hex(g), 8, '0') || '0000', 'hex'),
       (ARRAY['sad','ok','happy','ünïcödé']::mood[])[1 + g % 4],
       g, g * 1.0000000001, 12345678901234567890.123456789 * g,
       '2024-03-31 01:30:00+02'::timestamptz + g * interval '37 minutes',
       '1999-12-31 23:59:59.999999'::timestamp - g * interval '1 day',
       '0001-01-01'::date + g, make_interval(days => g, secs => g / 3.0),
       md5(g::text)::uuid, ('10.0.' || (g % 255) || '.1')::inet,
       g / 7.0, g % 2 = 0
FROM generate_series(1, 2000) g;
INSERT INTO everything (raw, doc, r) VALUES ('\x000000'::bytea, 'null'::jsonb, 'NaN'), (NULL, NULL, '-Infinity');
CREATE TABLE events (id int, happened date NOT NULL, payload text) PARTITION BY RANGE (happened);
CREATE TABLE events_2023 PARTITION OF events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO events SELECT g, '2023-01-01'::date + g, repeat('x', g % 50) FROM generate_series(1, 700) g;
CREATE TABLE audit (id serial PRIMARY KEY, what text, at timestamptz DEFAULT now());
CREATE FUNCTION note_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit (what, at) VALUES (TG_OP || ':' || NEW.id, '2000-01-01');
  RETURN NEW;
END $$;
CREATE TRIGGER everything_audit AFTER INSERT ON everything FOR EACH ROW EXECUTE FUNCTION note_change();
CREATE FUNCTION add_mood(a mood, b int) RETURNS text IMMUTABLE LANGUAGE sql AS $$ SELECT a::text || b $$;
CREATE VIEW happy_things AS SELECT id, doc->>'g' AS g FROM everything WHERE m = 'happy';
CREATE MATERIALIZED VIEW mood_counts AS SELECT m, count(*) FROM everything GROUP BY m;
CREATE INDEX everything_doc ON everything USING gin (doc);
INSERT INTO everything (doc) VALUES ('{"after": "trigger"}');
COMMENT ON TABLE everything IS 'every type we promise to keep — ✓';
-- pg_dump stores a materialized view's definition and refreshes it on restore
REFRESH MATERIALIZED VIEW mood_counts;
"""


async def load_rich(database: str) -> None:
    conn = await user_conn(database)
    try:
        await conn.execute(RICH_SCHEMA)
    finally:
        await conn.close()


async def schema_dump(database: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "pg_dump", "--schema-only", "--no-owner", "--no-acl", "-h", PG_HOST, "-p",
        str(PG_PORT), "-U", ADMIN_USER, database, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    # pg_dump >= 15.14 brackets its output with a random \restrict key: not part of the schema
    return "".join(line for line in out.decode().splitlines(keepends=True)
                   if not line.startswith(("\\restrict ", "\\unrestrict ")))


async def fingerprint(database: str) -> dict[str, Any]:
    """Schema (pg_dump --schema-only) + per-table data checksums + sequence states."""
    conn = await admin_conn(database)
    try:
        tables = await conn.fetch(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS t "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN "
            "('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1")
        data = {}
        for r in tables:
            t = r["t"]
            data[t] = await conn.fetchval(
                f"SELECT count(*)::text || ':' || coalesce(md5(string_agg(x::text, '|' "
                f"ORDER BY x::text)), '') FROM {t} x")
        seqs = {}
        for r in await conn.fetch(
                "SELECT schemaname, sequencename FROM pg_sequences ORDER BY 1, 2"):
            name = f'"{r["schemaname"]}"."{r["sequencename"]}"'
            row = await conn.fetchrow(f"SELECT last_value, is_called FROM {name}")
            seqs[name] = (row["last_value"], row["is_called"])
        large_objects = {r["oid"]: r["digest"] for r in await conn.fetch(
            "SELECT oid, md5(lo_get(oid)) AS digest FROM pg_largeobject_metadata ORDER BY 1")}
    finally:
        await conn.close()
    schema = await schema_dump(database)
    return {"schema": hashlib.sha256(schema.encode()).hexdigest(), "data": data,
            "sequences": seqs, "large_objects": large_objects}


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def private_cluster(databases: tuple[str, ...] = ("app",)) -> AsyncIterator[int]:
    """A private PostgreSQL cluster (initdb on a free port, trust, superuser `postgres`):
    a new server. Yields its port."""
    import pytest

    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 server binaries are needed (scripts/test.sh installs them)")
    d = Path(tempfile.mkdtemp(prefix="safehold-newpg-"))
    d.chmod(0o755)
    data = d / "data"
    port = _free_port()
    user = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
    if user:
        shutil.chown(d, "postgres")
    init = await asyncio.create_subprocess_exec(
        *user, str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(data),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await init.wait() == 0
    with open(data / "postgresql.conf", "a") as f:
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{d}'\nfsync = off\n")
    server = await asyncio.create_subprocess_exec(
        *user, str(PG_BIN / "postgres"), "-D", str(data),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def up() -> bool:
        try:
            c = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres")
        except (OSError, asyncpg.PostgresError):
            return False
        for name in databases:
            await c.execute(f'CREATE DATABASE "{name}"')
        await c.close()
        return True
    try:
        from tests.helpers import wait_for

        await wait_for(up, 30, "the private cluster")
        yield port
    finally:
        server.terminate()
        await server.wait()
        shutil.rmtree(d, ignore_errors=True)
