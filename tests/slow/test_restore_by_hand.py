"""The README's "Restoring by hand" recipes, run as pasted (only the file and database
names filled in) with stock gunzip and psql: into a new database, and over the live one
after real damage — twice — with a second schema and a large object; a broken file
changes nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from tests import pg
from tests.helpers import backup, stored_bytes
from tests.support.recipes import fill, recipes


def run(script: str, cwd: Path, user: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGHOST": pg.PG_HOST, "PGPORT": str(pg.PG_PORT), "PGUSER": user,
           "PGPASSWORD": pg.TEST_PASSWORD}
    return subprocess.run(["sh", "-c", "set -e\n" + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


async def test_the_by_hand_recipes_work_as_pasted(api: Any, worker: Any, pg_db: str,
                                                 storage_dir: Path, tmp_path: Path) -> None:
    new_db, over, _on_a_new_server = recipes()
    await pg.load_rich(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("SELECT lo_from_bytea(0, 'a large object'::bytea)")
    await conn.close()
    before = await pg.fingerprint(pg_db)
    name = (await backup(api))["result"]["filename"]
    (tmp_path / name).write_bytes(await stored_bytes(storage_dir, name))

    # into a new, empty database
    fresh = f"sh_byhand_{uuid.uuid4().hex[:8]}"
    script = fill(new_db, F=name).replace("app_restored", fresh)
    done = run(script, tmp_path, pg.ADMIN_USER)
    try:
        assert done.returncode == 0, done.stderr
        assert name in done.stdout  # sha256sum printed the file's digest
        got = await pg.fingerprint(fresh)
        assert got["data"] == before["data"] and got["large_objects"] == \
            before["large_objects"]
    finally:
        await pg.drop_database(fresh)

    # over the live database after the damage people make, twice
    conn = await pg.user_conn(pg_db)
    await conn.execute("DROP TABLE everything CASCADE")  # a view stood on it
    await conn.execute("CREATE SCHEMA scratch; CREATE TABLE scratch.t (x int)")
    await conn.execute("SELECT lo_from_bytea(0, 'another'::bytea)")
    await conn.close()
    script = fill(over, F=name, DB=pg_db)
    for _ in range(2):
        done = run(script, tmp_path, pg.TEST_USER)
        assert done.returncode == 0, done.stderr
        assert await pg.fingerprint(pg_db) == before

    # a broken file: psql stops, the one transaction rolls back, nothing changed
    blob = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(blob[: len(blob) * 2 // 3])
    done = run(script, tmp_path, pg.TEST_USER)
    assert done.returncode != 0
    assert await pg.fingerprint(pg_db) == before
    await asyncio.sleep(0)
