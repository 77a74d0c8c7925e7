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

from shared.config import Settings
from tests import my
from tests.helpers import (
    flip_byte,
    form,
    publish_bomb,
    publish_plain,
    read_events,
    republish,
    restore,
    restore_twice_unchanged,
    stored_bytes,
    stored_manifest,
    wait_for,
    wait_for_terminal,
    worker_process,
)
from worker.engines.mysql import MySQLDrill

PW_ENV = my.PW_ENV


@pytest.fixture
def settings(prefix: str, tmp_path: Path, my_db: str) -> Settings:
    """Override: target `main` is a MariaDB database reached as a password-protected user."""
    return my.target_settings(prefix, tmp_path, my_db)


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
    manifest = await stored_manifest(storage_dir, name)
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
    manifest = await stored_manifest(storage_dir, good)
    sql = gzip.decompress(await stored_bytes(storage_dir, good))
    cut = sql.index(b"INSERT INTO `item`")
    bad = "backup_mysql_20200101_000000.sql.gz"
    # a statement the check lets through (the shape mysqldump writes) that the server refuses
    await publish_plain(storage_dir, bad, sql[:cut] + b"INSERT INTO `no_such_table` VALUES (1);\n"
                        + sql[cut:], manifest)
    job = await (await api.post("/api/v1/targets/main/restores?wait=120",
                                json={"backup": bad})).json()
    assert job["status"] == "failed"
    err = job["error"]
    assert err["database_state"] == "rolled_back", err
    assert err["rollback"]["status"] == "succeeded"
    assert "no_such_table" in err["message"], err
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


TORTURE = [
    "CREATE VIEW happy_titles AS SELECT title FROM happy_items",  # a view over a view
    "CREATE SEQUENCE ticket_seq START WITH 100 INCREMENT BY 5",
    "SELECT NEXTVAL(ticket_seq)",
    """CREATE TRIGGER owner_guard BEFORE UPDATE ON owner FOR EACH ROW
       SET NEW.name = TRIM(NEW.name)""",
    """CREATE EVENT hourly ON SCHEDULE EVERY 1 HOUR STARTS '2031-01-01 00:00:00' DISABLE
       DO UPDATE audit SET what = what WHERE id < 0""",
]


async def load_torture(api: Any, my_db: str) -> tuple[dict[str, Any], str]:
    """The rich fixture plus TORTURE; (fingerprint, backup name)."""
    await my.load_rich(my_db)
    conn = await my.user_conn(my_db)
    await my.execute(conn, *TORTURE)
    conn.close()
    return await my.fingerprint(my_db), (await backup(api))["result"]["filename"]


async def test_restore_twice_over_the_live_database(api: Any, worker: Any, my_db: str) -> None:
    """Views over views, triggers, events, routines and a sequence: restoring the newest
    backup over the untouched database, twice, changes nothing."""
    before, name = await load_torture(api, my_db)
    await restore_twice_unchanged(api, name, lambda: my.fingerprint(my_db), before)


async def test_restore_after_a_table_was_dropped_under_a_view(
        api: Any, worker: Any, my_db: str, storage_dir: Path) -> None:
    """The reason people restore: a table dropped by mistake, views still pointing at it.
    The safety backup keeps the invalid views as definitions and says so; the restore works."""
    before, name = await load_torture(api, my_db)
    conn = await my.user_conn(my_db)
    await my.execute(conn, "SET FOREIGN_KEY_CHECKS = 0", "DROP TABLE item")
    conn.close()
    job = await restore(api, name)
    assert job["status"] == "succeeded", job
    assert await my.fingerprint(my_db) == before
    safety = job["result"]["safety_backup"]
    manifest = await stored_manifest(storage_dir, safety)
    assert manifest["invalid_views"] == ["happy_items", "happy_titles"]
    assert any("happy_items" in w for w in manifest["warnings"])
    kept = gzip.decompress(await stored_bytes(storage_dir, safety))
    assert b"-- view `happy_items`" in kept and b"VIEW `happy_items` AS" in kept
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    logs = " ".join(e["data"].get("message", "") for e in events if e["event"] == "log")
    assert "happy_items" in logs and "invalid" in logs
    # the safety backup itself restores (and brings back the damaged state, minus the views)
    job = await restore(api, safety)
    assert job["status"] == "succeeded", job
    after = await my.fingerprint(my_db)
    assert "table item" not in after and "view happy_items" not in after
    assert after["data owner"] == before["data owner"]


async def test_safety_backup_failure_says_unchanged_and_the_way_out(
        api: Any, worker: Any, my_db: str) -> None:
    """When the safety backup cannot be made at all, the restore does not start."""
    await my.load_rich(my_db)
    name = (await backup(api))["result"]["filename"]
    conn = await my.admin()
    try:  # the user may no longer read data: mariadb-dump fails on the first table
        await my.execute(
            conn, f"REVOKE ALL PRIVILEGES ON `sh\\_%`.* FROM '{my.USER}'@'127.0.0.1'",
            "GRANT INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, CREATE VIEW, SHOW VIEW, "
            "TRIGGER, EVENT, LOCK TABLES, CREATE ROUTINE, ALTER ROUTINE, EXECUTE ON "
            f"`{my_db}`.* TO '{my.USER}'@'127.0.0.1'")
        before = await my.fingerprint(my_db)
        job = await restore(api, name)
    finally:
        await my.ensure_user()
        conn.close()
    assert job["status"] == "failed"
    err = job["error"]
    assert err["code"] == "safety_backup_failed" and err["database_state"] == "unchanged", err
    assert "create_safety_backup=false" in err["message"]
    assert await my.fingerprint(my_db) == before


HEADER = b"-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB\n--\n"
FOOTER = b"\n-- Dump completed on 2026-11-30  3:47:21\n"


@pytest.mark.parametrize("payload", [
    b"\\! touch {marker}\n",
    b"system touch {marker}\n",
    b"  \\. {marker}\n",
    b"tee {marker}\n",
    b"LOAD DATA LOCAL INFILE '/etc/hostname' INTO TABLE owner;\n",
    b"USE mysql;\n",  # a `--databases` dump, or one aimed at another database
    b"CREATE DATABASE elsewhere;\n",
    b"GRANT ALL ON *.* TO 'eve'@'%';\n",
    b"SELECT 'x' INTO OUTFILE '{marker}';\n",
    b"/*!50000 USE mysql */;\n",  # executable comments run on the server
    # a statement after another on the same line: the client splits them, so does the check
    b"INSERT INTO x VALUES (1);  GRANT ALL ON *.* TO 'eve'@'%';\n",
    b"SELECT 'a;\\'; --'; /*!50000 CREATE USER eve */;\n",
    b"SET @s = 'SELECT 1'; PREPARE s FROM @s; EXECUTE s;\n",
])
async def test_client_commands_in_a_backup_are_refused(
        api: Any, worker: Any, my_db: str, storage_dir: Path, tmp_path: Path,
        payload: bytes) -> None:
    """Upload: 400 naming the line. Placed in storage by hand: refused before the clean."""
    await my.load_rich(my_db)
    good = (await backup(api))["result"]["filename"]
    marker = tmp_path / "marker"
    sql = HEADER + b"CREATE TABLE x (a INT);\n" + payload.replace(
        b"{marker}", str(marker).encode()) + FOOTER
    resp = await api.post("/api/v1/targets/main/uploads",
                          data=form(gzip.compress(sql)))
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "unsafe_backup", body
    assert "line 4:" in body["error"]["message"], body
    before = await my.fingerprint(my_db)
    manifest = await stored_manifest(storage_dir, good)
    bad = "upload_mysql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, sql, manifest)
    job = await restore(api, bad)
    assert job["status"] == "failed" and job["error"]["code"] == "unsafe_backup", job
    assert job["error"]["database_state"] == "unchanged"
    assert await my.fingerprint(my_db) == before
    assert not marker.exists()


async def test_a_bomb_placed_in_storage_stops_before_anything_is_dropped(
        api: Any, worker: Any, my_db: str, storage_dir: Path) -> None:
    """512 MiB of SQL comments in a ~1 MiB file, manifest silent about the plain size: the
    check before the clean stops at 100 × the stored size; the database is untouched."""
    await my.load_rich(my_db)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    before = await my.fingerprint(my_db)
    bad = "upload_mysql_20200101_000000.sql.gz"
    await publish_bomb(storage_dir, bad, HEADER, FOOTER, manifest)
    job = await restore(api, bad)
    assert job["status"] == "failed" and job["error"]["code"] == "expansion_limit", job
    assert job["error"]["database_state"] == "unchanged"
    assert await my.fingerprint(my_db) == before


async def test_a_worker_lost_mid_restore_says_unknown_and_one_call_undoes_it(
        api: Any, my_db: str, prefix: str, tmp_path: Path, settings: Settings) -> None:
    """MySQL DDL commits as it goes: a worker SIGKILLed while loading leaves the database
    partly restored. The job says so honestly (`unknown`), names the safety backup, and its
    `undo` call brings the database back to what it was before the restore."""
    await my.load_rich(my_db)
    conn = await my.user_conn(my_db)
    await my.execute(conn, "CREATE TABLE bulk (id INT PRIMARY KEY, v VARCHAR(200))",
                     "INSERT INTO bulk SELECT seq, REPEAT('v', 150) FROM seq_1_to_300000")
    conn.close()
    targets = {"main": {"engine": "mysql", "password_env": PW_ENV,
                        "url": settings.targets["main"].url}}
    proc = await worker_process(tmp_path, prefix, None, targets, {PW_ENV: my.PASSWORD})
    try:
        name = (await backup(api))["result"]["filename"]
        conn = await my.user_conn(my_db)
        await my.execute(conn, "DELETE FROM bulk WHERE id > 1000", "DROP VIEW happy_items")
        conn.close()
        before = await my.fingerprint(my_db)
        job_id = (await (await api.post("/api/v1/targets/main/restores",
                                        json={"backup": name})).json())["id"]

        async def loading() -> bool:
            job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
            assert job["status"] in ("queued", "running"), job
            return bool(job.get("restore_state") == "partial")

        await wait_for(loading, 60, "the restore to start loading")
        await asyncio.sleep(0.3)  # into the load: tables already dropped and recreated
        proc.kill()
        await proc.wait()
        job = await wait_for_terminal(api, job_id, timeout=90)
        err = job["error"]
        assert err["code"] == "worker_lost" and err["database_state"] == "unknown", err
        assert err["safety_backup"] in err["message"]
        undo = err["undo"]
        proc = await worker_process(tmp_path, prefix, None, targets, {PW_ENV: my.PASSWORD})
        job = await (await api.request(undo["method"], undo["path"] + "?wait=120",
                                       json=undo["body"])).json()
        assert job["status"] == "succeeded", job
        assert await my.fingerprint(my_db) == before
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_restore_drill_into_a_scratch_database(api: Any, worker: Any, my_db: str,
                                                     tmp_path: Path) -> None:
    """A drill restores into `safehold_drill_…`, compares every table's rows with the
    exact counts taken from the dump stream, runs the checks, drops the scratch database
    and one a killed drill left long ago; the live database is untouched."""
    await my.load_rich(my_db)
    before = await my.fingerprint(my_db)
    leaked = "safehold_drill_00000010_abcdef12"
    conn = await my.admin()
    await my.execute(conn, f"CREATE DATABASE `{leaked}`")
    conn.close()
    name = (await backup(api))["result"]["filename"]
    manifest = json.loads((tmp_path / "backups" / "main" / f"{name}.json").read_text())
    assert manifest["exact_counts"] == {"owner": 3, "item": 690, "audit": 700}
    assert manifest["exact_count_kind"] == "rows"
    # the drill loads the dump without its events (they would run against the copy)
    sql = gzip.decompress((tmp_path / "backups" / "main" / name).read_bytes())
    assert b"EVENT `nightly`" in sql

    async def pieces(size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(sql), size):
            yield sql[i:i + size]

    for size in (1, 7, 4096, len(sql)):
        loaded = b"".join([c async for c in MySQLDrill().restore_filter(pieces(size))])
        assert b"EVENT" not in loaded and b"Dumping events" not in loaded
        assert b"FUNCTION `twice`" in loaded and loaded.endswith(sql[-200:])
        assert len(sql) - len(loaded) < 2000
    job = await (await api.post("/api/v1/targets/main/verify?wait=120", json={})).json()
    assert job["status"] == "succeeded", job.get("error")
    result = job["result"]
    assert result["mode"] == "scratch-restore" and result["counts_compared"] == 3
    assert result["mismatches"] is None and result["rows_restored"] == 3 + 690 + 700
    assert result["swept_scratch"] == [leaked]
    assert result["not_restored"].startswith("events")
    assert await my.fingerprint(my_db) == before
    conn = await my.admin()
    left = await my.execute(conn, "SHOW DATABASES LIKE 'safehold\\_drill\\_%'")
    conn.close()
    assert left == [()]  # no scratch database left


async def test_drill_catches_rows_cut_from_a_checksum_valid_backup(
        api: Any, worker: Any, my_db: str, tmp_path: Path) -> None:
    """Rows cut out of one INSERT and the manifest's checksum redone: every checksum agrees
    and the restore runs, but the counts from the dump stream do not — the drill fails."""
    await my.load_rich(my_db)
    name = (await backup(api))["result"]["filename"]
    d = tmp_path / "backups" / "main"
    sql = gzip.decompress((d / name).read_bytes())
    start = sql.index(b"INSERT INTO `item` VALUES")
    end = sql.index(b";\n", start)
    rows = sql[start:end].split(b"),\n(")
    assert len(rows) == 690, len(rows)  # mariadb-dump: one row per line
    republish(d, name, sql[:start] + b"),\n(".join(rows[:-4]) + b")" + sql[end:])
    job = await (await api.post("/api/v1/targets/main/verify?wait=120",
                                json={"backup": name})).json()
    assert job["status"] == "failed" and job["error"]["code"] == "drill_failed", job
    assert job["error"]["verification"]["mismatches"] == {
        "item": {"expected": 690, "restored": 686}}


async def test_a_dump_whose_connection_is_killed_fails_and_keeps_nothing(
        api: Any, worker: Any, my_db: str, storage_dir: Path) -> None:
    """MariaDB `KILL` of the dump's connection (here while it waits on a table another
    session holds): the job fails with the cause, nothing is listed, no file is left."""
    await my.load_rich(my_db)
    holder = await my.admin()
    await my.execute(holder, f"USE `{my_db}`", "LOCK TABLES item WRITE")
    try:
        job_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
        killer = await my.admin()

        async def waiting_dump() -> list[Any]:
            rows = (await my.execute(killer, "SELECT ID FROM information_schema.PROCESSLIST "
                                             f"WHERE DB = '{my_db}' AND USER = '{my.USER}' "
                                             "AND STATE LIKE 'Waiting for table%'"))[0]
            return list(rows)
        rows = await wait_for(waiting_dump, 30, "the dump to wait on the locked table")
        for (thread,) in rows:
            await my.execute(killer, f"KILL {int(thread)}")
        killer.close()
    finally:
        await my.execute(holder, "UNLOCK TABLES")
        holder.close()
    job = await wait_for_terminal(api, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "dump_failed", job
    assert "lost connection" in job["error"]["message"].lower() or \
        "killed" in job["error"]["message"].lower(), job["error"]
    listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
    assert listed == []
    assert [p for p in storage_dir.rglob("*") if p.is_file()] == []


async def test_a_user_that_may_create_the_scratch_database_but_not_fill_it_is_told_the_grant(
        prefix: str, tmp_path: Path, my_db: str) -> None:
    """CREATE and DROP on `safehold\\_drill\\_%` let the drill make its database, but a
    dump's load also locks tables and writes rows: proven before the load, the drill is
    `drill_unavailable` (not run: the backup is not called bad) with the exact grant, and
    the scratch database is gone."""
    import uuid

    from shared.config import parse_settings
    from shared.errors import EngineError
    from tests.conftest import make_raw_config

    user = f"sh_drill_{uuid.uuid4().hex[:8]}"
    conn = await my.admin()
    try:
        await my.execute(conn, f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{user}'",
                         f"GRANT ALL ON `{my_db}`.* TO '{user}'@'%'",
                         f"GRANT CREATE, DROP ON `safehold\\_drill\\_%`.* TO '{user}'@'%'")
        raw = make_raw_config(prefix, tmp_path / "backups", None)
        raw["targets"] = {"main": {"engine": "mysql", "password_env": PW_ENV,
                                   "url": f"mysql://{user}@{my.HOST}:{my.PORT}/{my_db}"}}
        target = parse_settings(raw, {PW_ENV: f"pw-{user}"}, base=tmp_path,
                                source="<test>").targets["main"]
        with pytest.raises(EngineError) as caught:
            async with MySQLDrill().scratch(target):
                pytest.fail("the load would have been tried")
        assert caught.value.code == "drill_unavailable"
        assert f"GRANT ALL ON `safehold\\_drill\\_%`.* TO `{user}`@`%`" in \
            caught.value.message, caught.value.message
        left = await my.execute(conn, "SHOW DATABASES LIKE 'safehold\\_drill\\_%'")
        assert left == [()], left
    finally:
        await my.execute(conn, f"DROP USER IF EXISTS '{user}'@'%'")
        conn.close()
