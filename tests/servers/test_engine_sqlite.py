"""SQLite engine: online-backup snapshots, integrity-checked atomic restore."""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings, parse_settings
from tests.conftest import make_raw_config
from tests.helpers import (
    flip_byte,
    named_like,
    read_events,
    restore_twice_unchanged,
    stored_bytes,
    stored_manifest,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "app.db"


@pytest.fixture
def settings(prefix: str, tmp_path: Path, db_path: Path) -> Settings:
    """Override: one target, `main`, an SQLite file."""
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "sqlite", "path": str(db_path)}}
    return parse_settings(raw, {}, base=tmp_path, source="<test>")


def build(path: Path, rows: int = 500) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript("""
        PRAGMA journal_mode = WAL;
        PRAGMA foreign_keys = ON;
        PRAGMA user_version = 42;
        CREATE TABLE owner (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        CREATE TABLE thing (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            owner_id INTEGER REFERENCES owner(id) ON DELETE CASCADE,
            i INTEGER, r REAL, t TEXT, b BLOB, n
        );
        CREATE INDEX thing_owner ON thing(owner_id, t);
        CREATE TABLE log (id INTEGER PRIMARY KEY, what TEXT);
        CREATE TRIGGER thing_log AFTER INSERT ON thing BEGIN
            INSERT INTO log (what) VALUES ('thing ' || NEW.id);
        END;
        CREATE VIEW big_things AS SELECT id, t FROM thing WHERE i > 100;
    """)
    conn.executemany("INSERT INTO owner (name) VALUES (?)", [(f"ö-{i}",) for i in range(10)])
    conn.executemany(
        "INSERT INTO thing (owner_id, i, r, t, b, n) VALUES (?, ?, ?, ?, ?, ?)",
        [(1 + i % 10, i * 7 - 3000, i / 3.0, f"text {i} ✓", bytes([0, i % 256, 0]) * 5,
          None if i % 3 else (i if i % 2 else f"{i}")) for i in range(rows)])
    conn.commit()
    conn.close()


def fingerprint(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        schema = sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
        data = {}
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            rows = conn.execute(f'SELECT * FROM "{name}"').fetchall()
            types = conn.execute(f'SELECT * FROM "{name}"').description
            data[name] = (sorted(map(repr, rows)), [t[0] for t in types])
            data[name + ":types"] = sorted(repr(r) for r in conn.execute(
                f'SELECT typeof(rowid), * FROM "{name}"').fetchall()) if name != "sqlite_sequence" \
                else None
        return {"schema": schema, "data": data,
                "user_version": conn.execute("PRAGMA user_version").fetchone()[0],
                "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0]}
    finally:
        conn.close()


async def backup(api: Any) -> dict[str, Any]:
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    assert job["status"] == "succeeded", job
    return job


async def test_round_trip(api: Any, worker: Any, db_path: Path, storage_dir: Path) -> None:
    """Storage classes, BLOBs, indexes, triggers, views, WAL, user_version, FKs survive."""
    build(db_path)
    before = fingerprint(db_path)
    job = await backup(api)
    name = job["result"]["filename"]
    assert name.startswith("backup_sqlite_") and name.endswith(".db.gz")
    conn = sqlite3.connect(db_path)
    conn.executescript("DELETE FROM thing WHERE id % 2 = 0; DROP VIEW big_things; "
                       "PRAGMA user_version = 7; CREATE TABLE junk (x);")
    conn.close()  # leaves a -wal file with uncheckpointed changes behind
    resp = await api.post("/api/v1/targets/main/restores?wait=60", json={"backup": name})
    job = await resp.json()
    assert job["status"] == "succeeded", job
    assert job["result"]["safety_backup"].startswith("safety_backup_sqlite_")
    assert fingerprint(db_path) == before


async def test_restores_with_no_tool_at_all(api: Any, worker: Any, db_path: Path,
                                            storage_dir: Path, tmp_path: Path) -> None:
    """`gunzip -c backup.db.gz > app.db` gives back the same database."""
    build(db_path)
    job = await backup(api)
    proc = await asyncio.create_subprocess_shell(
        f"gunzip -c '{storage_dir / job['result']['filename']}' > '{tmp_path / 'copy.db'}'")
    assert await proc.wait() == 0
    assert fingerprint(tmp_path / "copy.db") == fingerprint(db_path)


async def test_backup_is_consistent_under_concurrent_writes(
        api: Any, worker: Any, db_path: Path, storage_dir: Path) -> None:
    """A writer committing pairs of rows during backups never yields a half pair."""
    build(db_path, rows=20_000)
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        conn = sqlite3.connect(db_path, timeout=30)
        conn.execute("CREATE TABLE IF NOT EXISTS pair_a (x)")
        conn.execute("CREATE TABLE IF NOT EXISTS pair_b (x)")
        conn.commit()
        while not stop.is_set():
            with conn:
                conn.execute("INSERT INTO pair_a VALUES (?)", (written[0],))
                conn.execute("INSERT INTO pair_b VALUES (?)", (written[0],))
            written[0] += 1
        conn.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        await asyncio.sleep(0.2)
        names = [(await backup(api))["result"]["filename"] for _ in range(3)]
    finally:
        stop.set()
        t.join()
    assert written[0] > 0
    for name in names:
        copy = storage_dir.parent / f"{name}.check.db"
        copy.write_bytes(gzip.decompress(await stored_bytes(storage_dir, name)))
        conn = sqlite3.connect(copy)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        a = conn.execute("SELECT count(*) FROM pair_a").fetchone()[0]
        b = conn.execute("SELECT count(*) FROM pair_b").fetchone()[0]
        conn.close()
        assert a == b


async def test_bad_backups_are_refused_and_data_stays(api: Any, worker: Any, db_path: Path,
                                                      storage_dir: Path) -> None:
    """A tampered file fails the checksum; a checksummed non-database fails integrity —
    either way the database is untouched and the job says so."""
    import hashlib
    import json

    build(db_path)
    good = (await backup(api))["result"]["filename"]
    before = fingerprint(db_path)
    path = storage_dir / good
    flip_byte(path, 50)
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": good})).json()
    assert job["error"]["code"] == "checksum_mismatch"

    bad = "backup_sqlite_20200101_000000.db.gz"
    junk = gzip.compress(b"SQLite format 3\x00" + b"\xff" * 8192)
    (storage_dir / bad).write_bytes(junk)
    manifest = await stored_manifest(storage_dir, good)
    manifest = named_like(manifest, bad)
    manifest.update(sha256=hashlib.sha256(junk).hexdigest(), size_bytes=len(junk))
    (storage_dir / f"{bad}.json").write_text(json.dumps(manifest))
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": bad})).json()
    assert job["status"] == "failed"
    assert job["error"]["database_state"] == "unchanged"
    assert "not a sound SQLite database" in job["error"]["message"]
    assert fingerprint(db_path) == before
    assert not list(db_path.parent.glob("*.safehold-restore-*"))


async def test_progress_over_sse_and_stats(api: Any, worker: Any, db_path: Path) -> None:
    """The backup's phases arrive over SSE; stats describe the file."""
    build(db_path)
    job = await backup(api)
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    phases = [e["data"]["phase"] for e in events if e["event"] == "phase"]
    assert "snapshot" in phases and "dumping" in phases
    stats = await (await api.get("/api/v1/targets/main/stats")).json()
    assert stats["journal_mode"] == "wal" and stats["user_version"] == 42
    assert {"name": "thing", "rows": 500} in stats["tables"]


async def test_upload_of_a_sqlite_file(api: Any, worker: Any, db_path: Path,
                                       tmp_path: Path) -> None:
    """An uploaded .db (gzip or not) is integrity-checked, then restorable."""
    import aiohttp

    build(db_path)
    other = tmp_path / "other.db"
    build(other, rows=3)
    before = fingerprint(other)
    form = aiohttp.FormData()
    form.add_field("file", gzip.compress(other.read_bytes()), filename="other.db.gz")
    resp = await api.post("/api/v1/targets/main/uploads?restore=true&wait=60", data=form)
    body = await resp.json()
    assert body["job"]["status"] == "succeeded", body
    assert fingerprint(db_path) == before
    form = aiohttp.FormData()
    form.add_field("file", b"SQLite format 3\x00" + b"\x00" * 100, filename="x.db")
    resp = await api.post("/api/v1/targets/main/uploads", data=form)
    assert resp.status == 400


async def test_restore_twice_over_the_live_database(api: Any, worker: Any,
                                                    db_path: Path) -> None:
    build(db_path)
    before = fingerprint(db_path)
    name = (await backup(api))["result"]["filename"]

    async def current() -> dict[str, Any]:
        return fingerprint(db_path)

    await restore_twice_unchanged(api, name, current, before)


async def test_restore_keeps_mode_and_leaves_no_temp_files(api: Any, worker: Any,
                                                           db_path: Path) -> None:
    """A WAL-mode database shared with a group (0664): after a restore the file has the
    same mode (and owner), and no `.…safehold-restore-…` file, -wal or -shm is left."""
    import os
    import sqlite3
    import stat

    build(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    os.chmod(db_path, 0o664)
    before = fingerprint(db_path)
    owner = (db_path.stat().st_uid, db_path.stat().st_gid)
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    name = job["result"]["filename"]
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM thing WHERE id % 3 = 0")
    conn.commit()
    conn.close()
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": name})).json()
    assert job["status"] == "succeeded", job.get("error")
    assert fingerprint(db_path) == before
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o664
    assert (db_path.stat().st_uid, db_path.stat().st_gid) == owner
    assert [p.name for p in db_path.parent.iterdir() if "safehold-restore" in p.name] == []


async def test_the_database_path_is_shown_to_admins_only(
        aiohttp_client: Any, settings: Settings, redis: Any, worker: Any,
        db_path: Path) -> None:
    """Issue 20 weak spot: /backup/stats showed viewers where the file lives."""
    from api.app import create_app
    from tests.conftest import bearer

    build(db_path)
    for role, shown in (("viewer", False), ("operator", False), ("admin", True)):
        c = await aiohttp_client(create_app(settings), headers=bearer(settings, role))
        for path in ("/api/v1/targets/main/stats", "/backup/stats"):
            body = await (await c.get(path)).json()
            assert ("path" in body) is shown and (str(db_path) in json.dumps(body)) is shown, \
                (role, path, body)


def _rows(path: Path) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, i, t FROM thing ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_a_restore_beside_writes_a_new_file_with_the_live_files_mode(
        api: Any, worker: Any, db_path: Path) -> None:
    """into_database on SQLite: a new file next to the target's, with its mode, holding the
    backup; the live file untouched; an existing file refused unless replace; a path, the
    live file's own name or a hostile name refused before any job."""
    import os

    build(db_path)
    db_path.chmod(0o640)
    name = (await (await api.post("/api/v1/targets/main/backups?wait=60")).json())[
        "result"]["filename"]
    backed_up = _rows(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM thing WHERE id % 2 = 0")
    conn.commit()
    conn.close()
    live = _rows(db_path)

    async def restore(**body: Any) -> dict[str, Any]:
        resp = await api.post("/api/v1/targets/main/restores?wait=60",
                              json={"backup": name, **body})
        assert resp.status in (200, 202), await resp.text()
        return dict(await resp.json())
    job = await restore(into_database="app-copy.db")
    assert job["status"] == "succeeded", job.get("error")
    copy = db_path.parent / "app-copy.db"
    assert _rows(copy) == backed_up and _rows(db_path) == live
    assert oct(os.stat(copy).st_mode & 0o777) == "0o640"
    job = await restore(into_database="app-copy.db")
    assert job["status"] == "failed" and job["error"]["code"] == "database_exists", job
    job = await restore(into_database="app-copy.db", replace=True)
    assert job["status"] == "succeeded" and job["result"]["safety_backup"], job
    (db_path.parent / "alias.db").symlink_to(db_path)  # the live file under another name
    job = await restore(into_database="alias.db", replace=True)
    assert job["status"] == "failed" and job["error"]["code"] == "database_refused", job
    assert _rows(db_path) == live
    (db_path.parent / "alias.db").unlink()
    for bad, status in [("../escape.db", 400), ("a/b.db", 400), ("app.db", 422),
                        (".hidden", 400), ("x" * 200, 400), ("nul\x00.db", 400)]:
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "into_database": bad})
        assert resp.status == status, (bad, await resp.text())
    assert sorted(p.name for p in db_path.parent.iterdir() if p.suffix == ".db") == [
        "app-copy.db", "app.db"]


async def test_one_table_restored_the_rest_left_as_it_is(
        api: Any, worker: Any, db_path: Path) -> None:
    """Issue 25 `tables` on SQLite: after a too-wide UPDATE, `thing` equals the backup's
    (rowids, AUTOINCREMENT counter) while `owner` and `log` keep what happened since —
    its trigger did not fire, and is back; twice; a dropped table comes back with its index
    and trigger; a restore that leaves a row pointing at nothing changes nothing; unknown
    and hostile names are refused before any job."""
    build(db_path, rows=200)
    name = (await backup(api))["result"]["filename"]
    backed_up = fingerprint(db_path)

    def run(sql: str) -> None:
        conn = sqlite3.connect(db_path)
        conn.executescript(sql)
        conn.close()

    async def restore(**body: Any) -> dict[str, Any]:
        resp = await api.post("/api/v1/targets/main/restores?wait=60",
                              json={"backup": name, **body})
        assert resp.status in (200, 202), await resp.text()
        return dict(await resp.json())

    run("UPDATE thing SET t = 'oops'; INSERT INTO owner (name) VALUES ('new'); "
        "INSERT INTO thing (owner_id, i) VALUES (1, 1); DELETE FROM log WHERE id < 5")
    live = fingerprint(db_path)
    for _ in range(2):
        job = await restore(tables=["thing"])
        assert job["status"] == "succeeded", job.get("error")
        now = fingerprint(db_path)
        assert now["data"]["thing"] == backed_up["data"]["thing"]
        assert now["data"]["thing:types"] == backed_up["data"]["thing:types"]
        for other in ("owner", "log"):
            assert now["data"][other] == live["data"][other]  # no trigger fired
        assert now["data"]["sqlite_sequence"] == backed_up["data"]["sqlite_sequence"]
        assert now["schema"] == live["schema"]  # trigger and index back as they were
    assert job["result"]["safety_backup"]

    run("DROP TABLE thing")
    job = await restore(tables=["thing"])
    assert job["status"] == "succeeded", job.get("error")
    now = fingerprint(db_path)
    assert now["data"]["thing"] == backed_up["data"]["thing"]
    assert now["schema"] == backed_up["schema"]  # index and trigger made again
    assert now["data"]["log"] == live["data"]["log"]

    run("DELETE FROM owner WHERE id = 2")  # rows of thing point at it in the backup
    live = fingerprint(db_path)
    job = await restore(tables=["thing"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "foreign_key_violation", job["error"]
    assert job["error"]["database_state"] == "unchanged"
    assert fingerprint(db_path) == live
    job = await restore(tables=["thing", "owner"])  # together they hold
    assert job["status"] == "succeeded", job.get("error")

    for bad, status, code in [(["nothere"], 422, "table_missing"),
                              (['thing"; DROP TABLE owner; --'], 400, "invalid_body"),
                              (["main.thing"], 422, "invalid_body"),
                              (["x" * 10_000], 400, "invalid_body")]:
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "tables": bad})
        assert resp.status == status, (bad, await resp.text())
        assert (await resp.json())["error"]["code"] == code


async def test_rows_of_one_table_read_from_a_sqlite_backup(
        api: Any, worker: Any, db_path: Path) -> None:
    build(db_path, rows=50)
    name = (await backup(api))["result"]["filename"]
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM thing")
    conn.commit()
    conn.close()
    base = f"/api/v1/targets/main/backups/{name}/contents/thing"
    got = await (await api.get(f"{base}?where=id=7")).json()
    assert got["columns"][:3] == ["id", "owner_id", "i"] and len(got["rows"]) == 1
    assert got["rows"][0][0] == "7" and got["rows"][0][5] == "\\x" + (bytes([0, 6, 0]) * 5).hex()
    assert got["checksum_verified"] is True
    got = await (await api.get(f"{base}?limit=10")).json()
    assert len(got["rows"]) == 10 and got["complete"] is False
    for query, status in [("?where=nope=1", 422), ("?where=x%22=1", 400)]:
        resp = await api.get(base + query)
        assert resp.status == status, (query, await resp.text())
    resp = await api.get(f"/api/v1/targets/main/backups/{name}/contents/nothere")
    assert resp.status == 422
