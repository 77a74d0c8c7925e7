"""A restore into another target (issue 25, `into_target`): prod's backup cloned into
staging with staging's credentials, lock and safety backup; prod never touched; the job
runs on staging and the audit names both; a caller needs operator on both (a token scoped
to prod is refused); another engine, an unknown target, a point in time are refused before
any job."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings, parse_settings
from tests import pg
from tests.conftest import JobWaiter, make_raw_config, token
from tests.helpers import backup


@pytest.fixture
async def staging_db() -> AsyncIterator[str]:
    name = await pg.create_database("staging")
    yield name
    await pg.drop_database(name)


@pytest.fixture
def settings(prefix: str, tmp_path: Path, pg_db: str, staging_db: str,
             test_env: dict[str, str]) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["staging"] = {**raw["targets"]["main"],
                                 "url": raw["targets"]["main"]["url"].replace(pg_db, staging_db)}
    raw["targets"]["files"] = {"engine": "sqlite", "path": str(tmp_path / "f.db")}
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


async def test_prods_backup_into_staging(api: Any, worker: Any, pg_db: str, staging_db: str,
                                         wait_job: JobWaiter, settings: Settings) -> None:
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    prod = await pg.fingerprint(pg_db)
    conn = await pg.user_conn(staging_db)
    await conn.execute("CREATE TABLE scratch (i int); INSERT INTO scratch VALUES (1)")
    await conn.close()
    for _ in range(2):  # twice: the second replaces the first, its safety backup first
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "into_target": "staging"})
        assert resp.status == 202, await resp.text()
        job = await wait_job((await resp.json())["id"], timeout=120)
        assert job["status"] == "succeeded", job.get("error")
        assert job["target"] == "staging"
        assert (await pg.fingerprint(staging_db))["data"] == prod["data"]
        assert await pg.fingerprint(pg_db) == prod
    safety = job["result"]["safety_backup"]
    staging = await (await api.get("/api/v1/targets/staging/backups")).json()
    assert safety in [b["filename"] for b in staging["backups"]]
    main = await (await api.get("/api/v1/targets/main/backups")).json()
    assert [b["filename"] for b in main["backups"]] == [name]  # nothing written to prod
    audit = await (await api.get("/api/v1/audit?action=create_restore")).json()
    said = [(e.get("backup"), e.get("target")) for e in audit["entries"]]
    assert (f"{name} from target main into target staging", "staging") in said, said

    scoped = {"Authorization": f"Bearer {token(settings, 'operator:main')}"}
    resp = await api.post("/api/v1/targets/main/restores", headers=scoped,
                          json={"backup": name, "into_target": "staging"})
    assert resp.status == 403, await resp.text()
    for body, status, code in [
            ({"into_target": "files"}, 422, "engine_mismatch"),
            ({"into_target": "nowhere"}, 404, None),
            ({"into_target": "../main"}, 404, "target_not_found"),
            ({"into_target": "staging", "into_database": "x"}, 422, "invalid_body")]:
        resp = await api.post("/api/v1/targets/main/restores", json={"backup": name, **body})
        assert resp.status == status, (body, await resp.text())
        if code:
            assert (await resp.json())["error"]["code"] == code
    resp = await api.post("/api/v1/targets/main/restores",  # (main has no PITR here)
                          json={"point_in_time": "latest", "into_target": "staging"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "pitr_not_enabled"
