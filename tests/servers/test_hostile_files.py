"""Every byte of a backup file is untrusted: hostile PostgreSQL scripts, decompression bombs
and lies in manifests, through uploads and through files placed in storage by hand."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests import pg
from tests.helpers import (
    backup,
    form,
    gzip_bomb,
    publish_plain,
    restore,
    stored_bytes,
    stored_manifest,
)
from tests.support.hostile import FOOTER, HEADER

HOSTILE = {
    "shell escape": (b"\\! touch {marker}\n", "meta-command"),
    "output to a pipe": (b"\\o |touch {marker}\nSELECT 1;\n", "meta-command"),
    "copy from program": (b"\\copy (select 1) to program 'touch {marker}'\n", "meta-command"),
    "gexec": (b"SELECT 'SELECT 1' \\gexec\n", "meta-command"),
    "set then use": (b"\\set x 1\n", "meta-command"),
    "second restrict": (b"\\restrict other\n", "\\restrict"),
    "wrong unrestrict": (b"\\unrestrict nope\n\\! touch {marker}\n", "\\unrestrict"),
    "commit mid-file": (b"DROP SCHEMA public CASCADE; COMMIT;\n", "transaction control"),
    "end mid-file": (b"END;\n", "transaction control"),
    "server program": (b"COPY (SELECT 1) TO PROGRAM 'touch {marker}';\n", "COPY"),
    "server file": (b"COPY pg_settings FROM '/etc/passwd';\n", "COPY"),
    "binary copy": (b"COPY t FROM stdin WITH (FORMAT binary);\n", "COPY"),
    "NUL in SQL": (b"DROP SCHEMA public CASCADE;\x00 then nothing\n", "NUL"),
    # what psql, the server and a naive scanner read differently (two reviews found these)
    "string continuation": (b"SELECT E'a'\n'\\''; COMMIT; --'\n;\n", "continued"),
    "quote meaning changed": (b"SET standard_conforming_strings = off;\n",
                              "standard_conforming_strings"),
    "computed setting": (b"SELECT set_config('standard_conforming'||'_strings','off',false);\n",
                         "set_config"),
    "carriage return": (b"-- x\rCOMMIT;\n", "carriage return"),
    "glued dollar": (b"CREATE FUNCTION x$$begin() RETURNS int LANGUAGE sql RETURN 1;\n",
                     "dollar sign"),
    "psql variable": (b"SELECT (ARRAY[1])[1:x] FROM q;\n", "psql variable"),
    "risky encoding": (b"SET client_encoding = 'SJIS';\n", "client encoding"),
    "fake marker": (b"SELECT set_config('safehold.txn', 'open', false);\n", "setting"),
    "backslash quote": (b"SELECT 'a\\' '; COMMIT; -- ';\n", "backslash before a quote"),
    # statements about the whole server, which a database's dump never holds (a superuser
    # running them reaches beyond the database restored)
    "superuser role": (b"ALTER ROLE safehold_test SUPERUSER;\n", "whole server"),
    "new role": (b"CREATE ROLE intruder LOGIN PASSWORD 'x';\n", "whole server"),
    "membership": (b"GRANT pg_execute_server_program\n  TO safehold_test;\n", "whole server"),
    "server setting": (b"ALTER SYSTEM SET archive_command = 'touch {marker}';\n",
                       "whole server"),
    "other database": (b"DROP DATABASE postgres;\n", "whole server"),
}


def hostile_sql(payload: bytes, marker: Path) -> bytes:
    return HEADER + payload.replace(b"{marker}", str(marker).encode()) + FOOTER


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_postgresql_scripts_are_refused_everywhere(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, tmp_path: Path,
        case: str) -> None:
    """Upload: 400 naming the line. Restore of the same file placed by hand: the job fails
    `unsafe_backup`, the database is unchanged, and nothing ran on this host."""
    payload, what = HOSTILE[case]
    marker = tmp_path / "marker"
    sql = hostile_sql(payload, marker)
    await pg.load_rich(pg_db)
    resp = await api.post("/api/v1/targets/main/uploads?restore=true",
                          data=form(gzip.compress(sql)))
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "unsafe_backup", body
    message = body["error"]["message"]
    assert ("line 8:" in message or "line 9:" in message) and what in message, body
    assert not marker.exists()

    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    before = await pg.fingerprint(pg_db)
    bad = "upload_postgresql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, sql, manifest)
    job = await restore(api, bad)
    err = job["error"]
    assert job["status"] == "failed" and err["code"] == "unsafe_backup", err
    assert err["database_state"] == "unchanged" and "line" in err["message"], err
    assert await pg.fingerprint(pg_db) == before
    assert not marker.exists()


async def test_upload_bombs_stop_at_the_inflation_bound(api: Any, worker: Any, pg_db: str,
                                                        tmp_path: Path) -> None:
    """A 2 GiB-inflating upload is stopped at 100 × its size, quickly; a NUL bomb is refused;
    an SQLite-target style bomb never fills the temp directory; other requests stay quick."""
    bomb = await asyncio.to_thread(gzip_bomb, HEADER, 2 << 30, FOOTER)
    assert len(bomb) < 5 << 20  # ~500× inflation
    t0 = time.monotonic()
    uploads = [api.post("/api/v1/targets/main/uploads", data=form(bomb)) for _ in range(4)]
    listing = asyncio.ensure_future(api.get("/api/v1/targets/main/backups"))
    answers = await asyncio.gather(*uploads)
    listed = await listing
    for resp in answers:
        body = await resp.json()
        assert resp.status == 413 and body["error"]["code"] == "expansion_limit", body
    assert listed.status == 200
    print(f"4 bombs of {len(bomb)} B refused in {time.monotonic() - t0:.1f}s")
    nul = gzip.compress(HEADER + b"SELECT 1;" + b"\0" * 100_000 + FOOTER)
    resp = await api.post("/api/v1/targets/main/uploads", data=form(nul))
    body = await resp.json()
    assert resp.status == 400 and "NUL" in body["error"]["message"], body


async def test_restore_refuses_a_file_that_inflates_past_its_manifest(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """A hand-placed file whose manifest under-declares its size (or a bomb under a real
    manifest) stops at the declared size: nothing committed, database unchanged."""
    await pg.load_rich(pg_db)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    plain = gzip.decompress(await stored_bytes(storage_dir, good))
    before = await pg.fingerprint(pg_db)
    bad = "upload_postgresql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, plain, manifest)
    lying = await stored_manifest(storage_dir, bad)
    lying["raw_bytes"] = len(plain) // 2
    (storage_dir / f"{bad}.json").write_text(json.dumps(lying))
    job = await restore(api, bad)
    err = job["error"]
    assert err["code"] == "expansion_limit" and err["database_state"] == "unchanged", err
    assert await pg.fingerprint(pg_db) == before
    assert job["progress"]["bytes_done"] <= job["progress"]["bytes_total"]


async def test_sqlite_bomb_never_fills_the_temp_directory(
        aiohttp_client: Any, tmp_path: Path, prefix: str, test_env: dict[str, str]) -> None:
    from api.app import create_app
    from shared.config import parse_settings
    from tests.conftest import bearer, make_raw_config

    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "sqlite", "path": str(tmp_path / "db.sqlite")}}
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    client = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    bomb = await asyncio.to_thread(gzip_bomb, b"SQLite format 3\x00", 1 << 30, b"")
    free_before = shutil.disk_usage("/tmp").free
    resp = await client.post("/api/v1/targets/main/uploads", data=form(bomb, "x.db.gz"))
    body = await resp.json()
    assert resp.status == 413 and body["error"]["code"] == "expansion_limit", body
    assert shutil.disk_usage("/tmp").free > free_before - (len(bomb) * 101 + (64 << 20))
    assert not [n for n in os.listdir("/tmp") if n.startswith("safehold-upload-")]


async def test_a_transaction_ended_behind_the_guards_back_is_caught_and_rolled_back(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, monkeypatch: Any) -> None:
    """The second line of defence: were the guard ever to miss a COMMIT, Safehold sees that
    its transaction is gone (txid before and after differ), does not report success, and
    restores the safety backup."""
    import re

    from shared.formats import pgscript

    monkeypatch.setattr(pgscript, "_TXN_CONTROL", re.compile(rb"(?!x)x"))  # a blind guard
    await pg.load_rich(pg_db)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    before = await pg.fingerprint(pg_db)
    sql = HEADER + b"CREATE TABLE leaked (x int);\ncommit;\nCREATE TABLE after_commit (y int);\n" \
        + FOOTER
    bad = "upload_postgresql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, sql, manifest)
    job = await restore(api, bad)
    err = job["error"]
    assert job["status"] == "failed" and err["code"] == "unsafe_backup", err
    assert err["database_state"] == "rolled_back", err
    assert await pg.fingerprint(pg_db) == before
