"""MySQL/MariaDB engine against the real MariaDB 10.11."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings, parse_settings
from tests import my
from tests.conftest import make_raw_config
from tests.test_failures_pg import flip_byte, publish_plain
from tests.test_sse import read_events

PW_ENV = "SAFEHOLD_TEST_MY_PASSWORD"


@pytest.fixture(scope="module", autouse=True)
def _user() -> None:
    asyncio.run(my.ensure_user())


@pytest.fixture
async def my_db() -> AsyncIterator[str]:
    name = await my.create_database()
    yield name
    await my.drop_database(name)


@pytest.fixture
def settings(prefix: str, tmp_path: Path, my_db: str) -> Settings:
    """Override: target `main` is a MariaDB database reached as a password-protected user."""
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "mysql", "password_env": PW_ENV,
                               "url": f"mysql://{my.USER}@{my.HOST}:{my.PORT}/{my_db}"}}
    return parse_settings(raw, {PW_ENV: my.PASSWORD}, base=tmp_path, source="<test>")


async def backup(api: Any) -> dict[str, Any]:
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    assert job["status"] == "succeeded", job
    return job


async def test_round_trip(api: Any, worker: Any, my_db: str, storage_dir: Path) -> None:
    """utf8mb4/emoji, BLOBs with NULs, DECIMAL, JSON, DATETIME(6), ENUM/SET, generated
    columns, FKs, view, trigger, procedure, function, event and AUTO_INCREMENT survive."""
    await my.load_rich(my_db)
    before = await my.fingerprint(my_db)
    counter = int(re.search(r"AUTO_INCREMENT=(\d+)", before["table item"])[1])  # type: ignore[index]
    assert counter > 700  # past the deleted rows: must be kept, not recomputed
    job = await backup(api)
    name = job["result"]["filename"]
    assert name.startswith("backup_mysql_") and name.endswith(".sql.gz")
    manifest = json.loads((storage_dir / f"{name}.json").read_text())
    assert manifest["tool"] in ("mariadb-dump", "mysqldump") and "--hex-blob" in manifest["options"]
    conn = await my.user_conn(my_db)
    await my.execute(conn, "DELETE FROM item WHERE id % 2 = 0", "DROP VIEW happy_items",
                     "DROP PROCEDURE add_owner", "CREATE TABLE intruder (x INT)")
    conn.close()
    job = await (await api.post("/api/v1/targets/main/restores?wait=120",
                                json={"backup": name})).json()
    assert job["status"] == "succeeded", job
    after = await my.fingerprint(my_db)
    assert after == before


async def test_stock_client_restores_it(api: Any, worker: Any, my_db: str,
                                        storage_dir: Path) -> None:
    """`gunzip -c f | mariadb db` into an empty database reproduces the original."""
    await my.load_rich(my_db)
    before = await my.fingerprint(my_db)
    path = storage_dir / (await backup(api))["result"]["filename"]
    empty = await my.create_database()
    try:
        proc = await asyncio.create_subprocess_shell(
            f"gunzip -c '{path}' | mariadb --binary-mode {empty}",
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert await my.fingerprint(empty) == before
    finally:
        await my.drop_database(empty)


async def test_failing_restore_rolls_back_from_the_safety_backup(
        api: Any, worker: Any, my_db: str, storage_dir: Path) -> None:
    """An SQL error mid-restore (DDL already committed) → automatic rollback, data as before."""
    await my.load_rich(my_db)
    good = (await backup(api))["result"]["filename"]
    conn = await my.user_conn(my_db)
    await my.execute(conn, "UPDATE item SET title = 'changed since' WHERE id < 10")
    conn.close()
    current = await my.fingerprint(my_db)
    manifest = json.loads((storage_dir / f"{good}.json").read_text())
    sql = gzip.decompress((storage_dir / good).read_bytes())
    cut = sql.index(b"INSERT INTO `item`")
    bad = "backup_mysql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, sql[:cut] + b"THIS IS NOT SQL;\n" + sql[cut:], manifest)
    job = await (await api.post("/api/v1/targets/main/restores?wait=120",
                                json={"backup": bad})).json()
    assert job["status"] == "failed"
    err = job["error"]
    assert err["database_state"] == "rolled_back", err
    assert err["rollback"]["status"] == "succeeded"
    assert "THIS IS NOT SQL" in err["message"] or "syntax" in err["message"]
    assert await my.fingerprint(my_db) == current


async def test_checksum_mismatch_touches_nothing(api: Any, worker: Any, my_db: str,
                                                 storage_dir: Path) -> None:
    """A tampered backup is refused before anything runs."""
    await my.load_rich(my_db)
    name = (await backup(api))["result"]["filename"]
    path = storage_dir / name
    flip_byte(path, path.stat().st_size // 3)
    before = await my.fingerprint(my_db)
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": name})).json()
    assert job["error"]["code"] == "checksum_mismatch"
    assert await my.fingerprint(my_db) == before


async def test_progress_stats_and_no_password_leftovers(api: Any, worker: Any, my_db: str
                                                        ) -> None:
    """Tables are counted over SSE; stats answer; the option file is gone afterwards."""
    await my.load_rich(my_db)
    before = set(os.listdir("/tmp"))
    job = await backup(api)
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    assert "dumping" in [e["data"]["phase"] for e in events if e["event"] == "phase"]
    final = [e for e in events if e["event"] == "succeeded"][0]
    assert final["data"]["result"]["raw_bytes"] > 0
    assert job["progress"]["items_total"] == 3 and job["progress"]["items_done"] == 3
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("safehold-my-")}
    stats = await (await api.get("/api/v1/targets/main/stats")).json()
    assert stats["server_version"].startswith("10.11")
    assert {t["name"] for t in stats["tables"]} == {"owner", "item", "audit"}
    assert stats["views"] == ["happy_items"] and stats["events"] == 1
    assert my.PASSWORD not in json.dumps([job, events, stats])
