"""PostgreSQL round trips through the API, and by hand with the stock tools."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

from tests import pg
from tests.helpers import backup, stored_manifest


async def test_roundtrip_rich_database(api: Any, worker: Any, pg_db: str,
                                       storage_dir: Path) -> None:
    """A database with many types survives backup, damage and restore byte-for-byte."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    job = await backup(api, note="before damage")
    filename = job["result"]["filename"]
    assert filename.startswith("backup_postgresql_") and filename.endswith(".sql.gz")

    conn = await pg.user_conn(pg_db)
    await conn.execute("""DELETE FROM everything WHERE id % 3 = 0;
                          DROP TABLE events; DROP SCHEMA "Ärger" CASCADE;
                          CREATE TABLE intruder (x int); SELECT setval('odd_seq', 5);""")
    await conn.close()
    assert await pg.fingerprint(pg_db) != before

    resp = await api.post("/api/v1/targets/main/restores?wait=120", json={"backup": filename})
    job = await resp.json()
    assert job["status"] == "succeeded", job
    safety = job["result"]["safety_backup"]
    assert safety.startswith("safety_backup_postgresql_")
    assert await pg.fingerprint(pg_db) == before

    listing = await (await api.get("/api/v1/targets/main/backups")).json()
    flagged = {b["filename"]: b["safety"] for b in listing["backups"]}
    assert flagged == {filename: False, safety: True}
    manifest = await stored_manifest(storage_dir, safety)
    assert manifest["parent"] == job["id"] and manifest["kind"] == "safety_backup"


async def test_backup_restores_by_hand_with_psql(api: Any, worker: Any, pg_db: str,
                                                 storage_dir: Path) -> None:
    """`gunzip -c f | psql` into an empty database reproduces the original exactly."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    job = await backup(api)
    path = storage_dir / job["result"]["filename"]
    empty = await pg.create_database("shmanual")
    try:
        proc = await asyncio.create_subprocess_shell(
            f"gunzip -c '{path}' | psql -X -q -v ON_ERROR_STOP=1 --single-transaction "
            f"-h {pg.PG_HOST} -p {pg.PG_PORT} -U {pg.TEST_USER} {empty}",
            env={"PGPASSWORD": pg.TEST_PASSWORD, "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert await pg.fingerprint(empty) == before
    finally:
        await pg.drop_database(empty)


async def test_uncompressed_backup(api: Any, worker: Any, pg_db: str, storage_dir: Path
                                   ) -> None:
    """compress=false stores plain SQL (`.sql`), checksummed, restorable."""
    await pg.load_rich(pg_db)
    job = await backup(api, compress=False)
    name = job["result"]["filename"]
    assert name.endswith(".sql") and not job["result"]["compressed"]
    text = (storage_dir / name).read_text()
    assert "CREATE TABLE public.everything" in text
    manifest = (await (await api.get(f"/api/v1/targets/main/backups/{name}")).json())
    assert manifest["compression"] is None and manifest["size_bytes"] == len(text.encode())
    resp = await api.post("/api/v1/targets/main/restores?wait=60", json={"backup": name})
    assert (await resp.json())["status"] == "succeeded"


async def test_gzip_output_is_standard(api: Any, worker: Any, pg_db: str, storage_dir: Path
                                       ) -> None:
    """The .gz is plain gzip that the stdlib reads and its size matches the manifest."""
    await pg.load_rich(pg_db)
    job = await backup(api)
    path = storage_dir / job["result"]["filename"]
    plain = gzip.decompress(path.read_bytes())
    assert len(plain) == job["result"]["raw_bytes"]
    assert plain.startswith(b"--\n-- PostgreSQL database dump")
