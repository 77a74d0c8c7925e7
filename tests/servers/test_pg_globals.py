"""The globals at the head of a PostgreSQL backup (issue 21) are untrusted input: parsed
against what `pg_dumpall --globals-only` writes, anything else refused; the roles a
restore creates never get more than one database needs."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from tests import pg
from tests.helpers import backup, publish_plain, restore, stored_manifest


async def test_a_hostile_head_changes_nothing(api: Any, worker: Any, pg_db: str,
                                              storage_dir: Path) -> None:
    """A file placed in storage with a head that is not pg_dumpall's: restored with
    roles = "create", the job fails `unsafe_backup` before anything ran, the database is
    unchanged and no role was created."""
    await pg.load_rich(pg_db)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    plain = gzip.decompress((storage_dir / good).read_bytes())
    before = await pg.fingerprint(pg_db)
    intruder = f"intruder_{pg_db[-8:]}"
    for n, head in enumerate([
            f"-- G CREATE ROLE {intruder};\n-- G ALTER ROLE {intruder} WITH LOGIN "
            f"PASSWORD 'x';\n-- G DROP DATABASE postgres;\n",
            f"-- G CREATE ROLE {intruder};\n-- G \\! touch /tmp/safehold-x\n"]):
        name = f"upload_postgresql_2020010{n + 1}_000000.sql.gz"
        await publish_plain(storage_dir, name, head.encode() + plain,
                            {**manifest, "roles": [intruder, *manifest.get("roles", [])]})
        job = await restore(api, name, roles="create")
        err = job["error"]
        assert job["status"] == "failed" and err["code"] == "unsafe_backup", err
        assert err["database_state"] == "unchanged" and "line 1:" in err["message"], err
        assert await pg.fingerprint(pg_db) == before
        admin = await pg.admin_conn()
        try:
            assert not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1",
                                            intruder)
        finally:
            await admin.close()


