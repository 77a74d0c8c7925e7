"""Restore drills: a good backup passes (restored into a scratch database, exact counts from
the dump stream compared), a checksum-valid but wrong backup is caught, user checks run,
the scratch copy is always dropped, and the outcome lands in the manifest."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from api.app import create_app
from shared.config import Settings, parse_settings
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import backup, republish, running_worker
from worker.engines import drill_name


def drill_settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str],
                   role: str, **target: Any) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["url"] = raw["targets"]["main"]["url"].replace(
        f"{pg.TEST_USER}@", f"{role}@")
    raw["targets"]["main"].update(target)
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


async def scratch_databases(role: str) -> list[str]:
    conn = await pg.admin_conn()
    try:
        return [r[0] for r in await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'safehold_drill_%'")]
    finally:
        await conn.close()


async def test_drill_passes_on_a_good_backup(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], createdb_role: str) -> None:
    settings = drill_settings(prefix, tmp_path, pg_db, test_env, createdb_role,
                              verify_checks=["SELECT count(*) > 0 FROM everything"])
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    # scratch databases a killed drill left: one from long ago, one that may be in use
    leaked, recent = "safehold_drill_00000010_abcdef12", drill_name()
    conn = await pg.admin_conn()
    for db in (leaked, recent):
        await conn.execute(f'CREATE DATABASE "{db}" OWNER {createdb_role}')
    await conn.close()
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        name = (await backup(api))["result"]["filename"]
        job = await (await api.post("/api/v1/targets/main/verify?wait=120", json={})).json()
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["swept_scratch"] == [leaked]
    assert await scratch_databases(createdb_role) == [recent]
    conn = await pg.admin_conn()
    await conn.execute(f'DROP DATABASE "{recent}"')
    await conn.close()
    result = job["result"]
    assert result["backup"] == name and result["mode"] == "scratch-restore"
    assert result["outcome"] == "passed" and result["counts_compared"] >= 3
    assert result["mismatches"] is None and result["checks"][0]["ok"] is True
    assert result["rto_s"] > 0
    conn = await pg.user_conn(pg_db)
    real = await conn.fetchval("SELECT count(*) FROM everything")
    await conn.close()
    manifest = json.loads((tmp_path / "backups" / "main" / f"{name}.json").read_text())
    assert manifest["exact_counts"]["public.everything"] == real
    assert manifest["verification"]["outcome"] == "passed" and manifest["verified_at"]
    assert await scratch_databases(createdb_role) == []
    text = await (await api.get("/metrics")).text()
    assert 'safehold_last_verify_passed{target="main"} 1.0' in text
    assert 'safehold_last_verify_rto_seconds{target="main"}' in text


async def test_drill_catches_a_checksum_valid_but_wrong_backup(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], createdb_role: str) -> None:
    """Rows cut out of one table's COPY data and the manifest's checksum redone: every
    checksum agrees, the restore runs, the counts do not — the drill fails and says where;
    a failing user check fails it too."""
    settings = drill_settings(prefix, tmp_path, pg_db, test_env, createdb_role,
                              verify_checks=["SELECT count(*) > 1000000 FROM everything"])
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        name = (await backup(api))["result"]["filename"]
        d = tmp_path / "backups" / "main"
        sql = gzip.decompress((d / name).read_bytes())
        head, rest = sql.split(b"COPY public.everything ", 1)
        header, data = rest.split(b"\n", 1)
        rows, tail = data.split(b"\n\\.\n", 1)
        kept = b"\n".join(rows.split(b"\n")[: -5])  # five rows gone
        republish(d, name, head + b"COPY public.everything " + header + b"\n" + kept
                  + b"\n\\.\n" + tail)
        job = await (await api.post("/api/v1/targets/main/verify?wait=120",
                                    json={"backup": name})).json()
    assert job["status"] == "failed" and job["error"]["code"] == "drill_failed", job
    verification = job["error"]["verification"]
    assert verification["mismatches"]["public.everything"]["restored"] == \
        verification["mismatches"]["public.everything"]["expected"] - 5
    assert verification["checks"][0]["ok"] is False
    assert "public.everything" in job["error"]["message"]
    manifest = json.loads((d / f"{name}.json").read_text())
    assert manifest["verification"]["outcome"] == "failed"
    assert await scratch_databases(createdb_role) == []


async def test_drill_without_createdb_says_what_to_grant(
        api: Any, worker: Any, pg_db: str) -> None:
    """…and the drill is recorded as not run (the backup is not called bad), while the
    metric still alerts: the last drill did not pass."""
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    job = await (await api.post("/api/v1/targets/main/verify?wait=60", json={})).json()
    assert job["status"] == "failed" and job["error"]["code"] == "drill_unavailable", job
    assert f"grant CREATEDB to {pg.TEST_USER}" in job["error"]["message"]
    manifest = (await (await api.get(f"/api/v1/targets/main/backups/{name}")).json())
    assert manifest["verification"]["outcome"] == "not_run"
    assert manifest["verification"]["error"] == "drill_unavailable"
    assert "CREATEDB" in manifest["verification"]["why"]
    assert 'safehold_last_verify_passed{target="main"} 0.0' in \
        await (await api.get("/metrics")).text()


async def test_sqlite_drill(aiohttp_client: Any, redis: Redis, prefix: str,
                            tmp_path: Path, test_env: dict[str, str]) -> None:
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2), (3);"
                       "CREATE TABLE u (y TEXT); INSERT INTO u VALUES ('a');")
    conn.commit()
    conn.close()
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "sqlite", "path": str(db),
                               "verify_checks": ["SELECT count(*) = 3 FROM t"]}}
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await backup(api)
        job = await (await api.post("/api/v1/targets/main/verify?wait=60", json={})).json()
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["counts_compared"] == 2 and job["result"]["rows_restored"] == 4


INHERITANCE = """
CREATE TABLE parent (id int, note text);
CREATE TABLE child (extra int) INHERITS (parent);
CREATE TABLE grandchild (more int) INHERITS (child);
INSERT INTO parent VALUES (1, 'own'), (2, 'own');
INSERT INTO child VALUES (3, 'c', 1), (4, 'c', 1), (5, 'c', 1);
INSERT INTO grandchild VALUES (6, 'g', 1, 1);
CREATE TABLE lonely_parent (id int);
CREATE TABLE lonely_child () INHERITS (lonely_parent);
INSERT INTO lonely_child VALUES (1), (2);
CREATE TABLE measurements (at date NOT NULL, v int) PARTITION BY RANGE (at);
CREATE TABLE measurements_2025 PARTITION OF measurements
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements
    FOR VALUES FROM ('2026-01-01') TO ('2027-01-01') PARTITION BY RANGE (at);
CREATE TABLE measurements_2026h1 PARTITION OF measurements_2026
    FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
CREATE TABLE measurements_2026h2 PARTITION OF measurements_2026
    FOR VALUES FROM ('2026-07-01') TO ('2027-01-01');
INSERT INTO measurements SELECT d, 1 FROM generate_series('2025-01-01'::date,
    '2026-12-31'::date, '1 day') d;
"""


async def test_drill_passes_with_inheritance_and_partitions(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], createdb_role: str) -> None:
    """Issue 20.2: a parent's count(*) includes its children's rows while the dump holds
    each table's own rows; the drill counts each table alone (ONLY), so a healthy backup
    with (multi-level) inheritance, a parent with rows of its own, an empty parent and
    (sub-)partitions passes with every table's exact count."""
    settings = drill_settings(prefix, tmp_path, pg_db, test_env, createdb_role)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    conn = await pg.user_conn(pg_db)
    await conn.execute(INHERITANCE)
    await conn.close()
    async with running_worker(settings):
        name = (await backup(api))["result"]["filename"]
        job = await (await api.post("/api/v1/targets/main/verify?wait=120",
                                    json={"backup": name})).json()
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["outcome"] == "passed", job["result"]
    assert job["result"]["mismatches"] is None
    manifest = json.loads((tmp_path / "backups" / "main" / f"{name}.json").read_text())
    counts = manifest["exact_counts"]
    assert {k: counts[k] for k in ("public.parent", "public.child", "public.grandchild",
                                   "public.lonely_parent", "public.lonely_child")} == {
        "public.parent": 2, "public.child": 3, "public.grandchild": 1,
        "public.lonely_parent": 0, "public.lonely_child": 2}
    assert counts["public.measurements_2025"] == 365
    assert counts["public.measurements_2026h1"] + counts["public.measurements_2026h2"] == 365
    assert job["result"]["counts_compared"] >= 8


async def test_an_offline_key_backup_is_drilled_with_the_identity_sent(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str], createdb_role: str) -> None:
    """Issue 22, item 4: the worker holds no key (an offline escrow key): a drill without
    one is recorded `not_run` with why — not `failed`, which means a bad backup —; the
    identity sent with the drill (sealed to the workers, never stored) lets it run and
    pass; a wrong one is `not_run` too; a non-identity is a 422 before any job."""
    import pyrage

    key = pyrage.x25519.Identity.generate()
    stranger = pyrage.x25519.Identity.generate()
    settings = drill_settings(prefix, tmp_path, pg_db, test_env, createdb_role,
                              compression="zstd",
                              encryption={"recipients": [str(key.to_public())]})
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))

    async def drill(**body: Any) -> dict[str, Any]:
        resp = await api.post("/api/v1/targets/main/verify?wait=120",
                              json={"backup": name, **body})
        doc: dict[str, Any] = await resp.json()
        return doc

    def recorded() -> dict[str, Any]:
        doc = json.loads((tmp_path / "backups" / "main" / f"{name}.json").read_text())
        return dict(doc["verification"])

    async with running_worker(settings):
        await pg.load_rich(pg_db)
        name = (await backup(api))["result"]["filename"]
        job = await drill()
        assert job["status"] == "failed" and job["error"]["code"] == "identity_required"
        assert "restore or drill" in job["error"]["message"]
        v = recorded()
        assert v["outcome"] == "not_run" and v["error"] == "identity_required"
        assert "no identity" in v["why"]
        listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
        assert listed[0]["verification"]["outcome"] == "not_run"
        text = await (await api.get("/metrics")).text()  # still alerts: no drill passed
        assert 'safehold_last_verify_passed{target="main"} 0.0' in text

        resp = await api.post("/api/v1/targets/main/verify",
                              json={"backup": name, "identity": "AGE-SECRET-KEY-1NOPE"})
        assert resp.status == 422 and (await resp.json())["error"]["code"] == \
            "invalid_identity"
        job = await drill(identity=f"{stranger}\n")
        assert job["status"] == "failed" and job["error"]["code"] == "wrong_identity", job
        assert recorded()["outcome"] == "not_run"
        job = await drill(identity=f"# escrow\n{key}\n")
        assert job["status"] == "succeeded", job.get("error")
        assert job["result"]["outcome"] == "passed" and job["result"]["counts_compared"] >= 3
    assert recorded()["outcome"] == "passed"
    assert not [k async for k in redis.scan_iter(f"{prefix}:*sealed_identity*")]
    secret = str(key).split("-")[-1].encode()
    async for k in redis.scan_iter(f"{prefix}:*"):
        if (await redis.type(k)) == b"string":
            assert secret not in (await redis.get(k) or b"")
