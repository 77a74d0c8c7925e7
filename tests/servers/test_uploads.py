"""Uploads and downloads: streamed, capped, validated; bad files leave nothing, drop nothing."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from tests import pg
from tests.conftest import bearer
from tests.helpers import backup, form, stored_bytes


async def dump_of(api: Any, storage_dir: Path) -> bytes:
    """A real pg_dump of the test database, as Safehold stored it (gzip)."""
    job = await backup(api)
    return await stored_bytes(storage_dir, job["result"]["filename"])


def leftovers(storage_dir: Path) -> list[str]:
    return sorted(p.name for p in storage_dir.iterdir()) if storage_dir.exists() else []


async def test_upload_then_restore(api: Any, worker: Any, pg_db: str, storage_dir: Path
                                   ) -> None:
    """A multipart upload is checksummed, listed as upload_…, and ?restore=true restores it."""
    await pg.load_rich(pg_db)
    blob = await dump_of(api, storage_dir)
    before = await pg.fingerprint(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("DROP TABLE everything CASCADE")
    await conn.close()

    resp = await api.post("/api/v1/targets/main/uploads?restore=true&wait=60", data=form(blob))
    body = await resp.json()
    assert resp.status == 200, body
    up = body["upload"]
    assert up["filename"].startswith("upload_postgresql_") and up["filename"].endswith(".gz")
    assert up["sha256"] == hashlib.sha256(blob).hexdigest()
    assert up["original_filename"] == "my_backup.sql.gz"
    assert up["kind"] == "upload" and up["raw_bytes"] > 0
    assert body["job"]["status"] == "succeeded", body["job"]
    assert await pg.fingerprint(pg_db) == before


async def test_raw_plain_sql_upload(api: Any, worker: Any, pg_db: str, storage_dir: Path
                                    ) -> None:
    """A raw (non-multipart) plain SQL body is accepted and stored as .sql."""
    await pg.load_rich(pg_db)
    plain = gzip.decompress(await dump_of(api, storage_dir))
    resp = await api.post("/api/v1/targets/main/uploads", data=plain,
                          headers={"Content-Type": "application/sql"})
    body = await resp.json()
    assert resp.status == 201, body
    assert body["filename"].endswith(".sql") and body["compression"] is None
    assert body["raw_bytes"] == len(plain)


BAD = {
    "not gzip, not sql": (b"\x00\x01binary junk" * 100, "invalid_upload"),
    "truncated gzip": (None, "invalid_upload"),
    "gzip of other content": (gzip.compress(b"hello world\n" * 1000), "invalid_upload"),
    "mysql dump": (gzip.compress(b"-- MariaDB dump 10.19  Distrib 10.11.6-MariaDB\n"
                                 b"CREATE TABLE `t` (`x` int);\n-- Dump completed\n"),
                   "invalid_upload"),
    "sqlite file": (b"SQLite format 3\x00" + b"\x00" * 4000, "invalid_upload"),
    "pg custom format": (b"PGDMP\x01\x0e\x00" + b"\x00" * 100, "invalid_upload"),
    "cut-off plain dump": (None, "invalid_upload"),
    "empty": (b"", "invalid_upload"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_uploads_leave_nothing_and_drop_nothing(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, case: str) -> None:
    """Each invalid upload is refused with 400; no file is left and the data is untouched."""
    await pg.load_rich(pg_db)
    good = await dump_of(api, storage_dir)
    data, code = BAD[case]
    if case == "truncated gzip":
        data = good[: len(good) // 2]
    if case == "cut-off plain dump":
        plain = gzip.decompress(good)
        data = gzip.compress(plain[: len(plain) // 2])
    before_files = leftovers(storage_dir)
    before = await pg.fingerprint(pg_db)
    resp = await api.post("/api/v1/targets/main/uploads?restore=true", data=form(data))
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["code"] == code
    assert leftovers(storage_dir) == before_files
    assert await pg.fingerprint(pg_db) == before
    jobs = (await (await api.get("/api/v1/jobs?kind=restore")).json())["jobs"]
    assert jobs == []


async def test_oversize_upload_is_413_and_leaves_nothing(
        aiohttp_client: Any, settings: Any, redis: Any, storage_dir: Path) -> None:
    """Past server.max_upload_bytes the upload stops with 413 and its temp file is gone."""
    small = replace(settings, server=replace(settings.server, max_upload_bytes=50_000))
    c = await aiohttp_client(create_app(small), headers=bearer(small, "operator"))
    blob = gzip.compress(b"-- PostgreSQL database dump\n" + b"x" * 10, 1) + b"\0" * 200_000
    resp = await c.post("/api/v1/targets/main/uploads", data=form(blob))
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "too_large"

    async def chunks() -> Any:  # no Content-Length: the cap must hold while streaming
        for _ in range(20):
            yield b"y" * 10_000

    resp = await c.post("/api/v1/targets/main/uploads", data=chunks(),
                        headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 413
    assert leftovers(storage_dir) == []


async def test_download_headers_range_and_etag(api: Any, worker: Any, pg_db: str,
                                               storage_dir: Path) -> None:
    """Downloads carry Content-Disposition, Content-Length and ETag=sha256; Range works."""
    await pg.load_rich(pg_db)
    job = await backup(api)
    name, sha = job["result"]["filename"], job["result"]["sha256"]
    url = f"/api/v1/targets/main/backups/{name}/download"
    resp = await api.get(url)
    data = await resp.read()
    assert resp.headers["ETag"] == f'"{sha}"'
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{name}"'
    assert int(resp.headers["Content-Length"]) == len(data) == job["result"]["size_bytes"]
    resp = await api.get(url, headers={"If-None-Match": f'"{sha}"'})
    assert resp.status == 304
    resp = await api.get(url, headers={"Range": "bytes=-100"})
    assert resp.status == 206 and await resp.read() == data[-100:]
    assert resp.headers["Content-Range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
    resp = await api.get(url, headers={"Range": "bytes=100-", "If-Range": '"stale"'})
    assert resp.status == 200 and len(await resp.read()) == len(data)
    resp = await api.get(url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert resp.status == 416


TRAVERSAL = [
    "..", "../..", "..%2F..%2Fsafehold.toml", "%2Fetc%2Fpasswd", "..%5C..%5Cwin.ini",
    "backup_postgresql_20240101_000000.sql.gz%00.txt",
    "backup_postgresql_20240101_000000.sql.gz%2F..%2F..%2Fx",
    "a" * 300 + ".sql.gz",
    "backup_postgresql_20240101_000000%EF%BC%8Esql.gz",  # fullwidth full stop
    "b%D0%B0ckup_postgresql_20240101_000000.sql.gz",  # Cyrillic a
    "backup_postgresql_20240101_000000.sql.gz.json",
    ".tmp-abc-1234.partial",
    "%2E%2E",
]


@pytest.mark.parametrize("name", TRAVERSAL)
async def test_traversal_matrix(api: Any, name: str, storage_dir: Path, tmp_path: Path) -> None:
    """No client-supplied name reaches a path: every one is 400 (or 404), never a file."""
    (tmp_path / "secret.txt").write_text("top secret")
    urls = [("GET", f"/api/v1/targets/main/backups/{name}"),
            ("GET", f"/api/v1/targets/main/backups/{name}/download"),
            ("DELETE", f"/api/v1/targets/main/backups/{name}"),
            ("GET", f"/backup/download/{name}"),
            ("POST", f"/backup/restore/{name}"),
            ("DELETE", f"/backup/delete/{name}")]
    for method, url in urls:
        resp = await api.request(method, url)
        body = await resp.read()
        assert b"top secret" not in body
        if resp.url.path == "/" and method == "GET":  # "../.." resolved to the web page
            assert resp.content_type == "text/html" and b"<title>Safehold</title>" in body
            continue
        assert resp.status in (400, 404, 405), (method, url, resp.status)
    resp = await api.post("/api/v1/targets/main/restores", json={"backup": name})
    assert resp.status in (400, 404)


async def test_other_targets_files_are_out_of_reach(api: Any, storage_dir: Path) -> None:
    """A valid name that exists only under another target's directory is 404 here."""
    other = storage_dir.parent / "other"
    other.mkdir(parents=True)
    name = "backup_postgresql_20240101_000000.sql.gz"
    (other / name).write_bytes(b"other target's data")
    (other / f"{name}.json").write_text('{"engine": "postgresql"}')
    resp = await api.get(f"/api/v1/targets/main/backups/{name}/download")
    assert resp.status == 404
    resp = await api.get(f"/backup/download/{name}")
    assert resp.status == 404


async def test_concurrent_uploads_in_one_second_get_distinct_names(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """Five uploads at once (same second, no target lock) each get their own name; none is
    overwritten or lost (names are claimed in Redis before anything is written)."""
    import asyncio

    await pg.load_rich(pg_db)
    blob = await dump_of(api, storage_dir)
    resps = await asyncio.gather(*(api.post("/api/v1/targets/main/uploads", data=form(blob))
                                   for _ in range(5)))
    bodies = [await r.json() for r in resps]
    assert [r.status for r in resps] == [201] * 5, bodies
    names = {b["filename"] for b in bodies}
    assert len(names) == 5
    for name in names:
        assert hashlib.sha256(await stored_bytes(storage_dir, name)).hexdigest() == \
            hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize("headers", [
    b'Content-Disposition: form-data; name="file"; filename="a\x00b.sql.gz"\r\n',
    b'Content-Disposition: form-data; name="file"; filename="a\r\nX-Evil: 1"\r\n',
    b'Content-Disposition: form-data; name="file"; filename*=bogus\'\'%ZZ\r\n',
])
async def test_lying_multipart_headers_are_a_400(api: Any, headers: bytes,
                                                 storage_dir: Path) -> None:
    """A NUL or a line break in a part's headers, or a broken Content-Disposition, is the
    client's error (400 invalid_upload), never a 500, and leaves nothing behind."""
    body = b"--XYZ\r\n" + headers + b"\r\nhello\r\n--XYZ--\r\n"
    resp = await api.post("/api/v1/targets/main/uploads", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=XYZ"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "invalid_upload"
    assert [p for p in storage_dir.rglob("*") if p.is_file()] == []
