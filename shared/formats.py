"""What each engine restores, checked before an uploaded file is accepted.

`validate(engine, path, compressed)` reads the whole file (decompressing it completely) and
raises BadRequest unless it is content that engine's restore accepts. It returns manifest
facts found on the way (plain size, schemas…). Blocking: run it in a thread.
"""

from __future__ import annotations

import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shared.codecs import CHUNK, GzipDecompress
from shared.errors import BadRequest, PipelineError
from shared.resp import RespReader

_PG_HEADER = b"-- PostgreSQL database dump"
_PG_FOOTER = b"-- PostgreSQL database dump complete"
_PG_CUSTOM_MAGIC = b"PGDMP"
_CREATE_SCHEMA = re.compile(rb"^CREATE SCHEMA (\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*);$", re.M)


def plain_chunks(path: Path, compressed: bool) -> Iterator[bytes]:
    """The plain content of a file, decompressed in bounded chunks."""
    gunzip = GzipDecompress() if compressed else None
    with open(path, "rb") as f:
        while block := f.read(256 * 1024):
            if gunzip is None:
                yield block
                continue
            gunzip.push(block)
            while out := gunzip.pull(CHUNK):
                yield out
    if gunzip is not None:
        gunzip.flush()


def _unquote(ident: bytes) -> str:
    text = ident.decode("utf-8", "replace")
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()


def validate_postgresql(path: Path, compressed: bool) -> dict[str, Any]:
    """A complete plain-SQL pg_dump: header first, `dump complete` footer last."""
    size = 0
    head = b""
    tail = b""
    carry = b""
    schemas: set[str] = {"public"}
    for chunk in plain_chunks(path, compressed):
        if size == 0 and chunk.startswith(_PG_CUSTOM_MAGIC):
            raise BadRequest("this is a pg_dump custom-format archive; upload a plain SQL dump "
                             "(pg_dump --format=plain)", code="invalid_upload")
        size += len(chunk)
        if len(head) < 4096:
            head += chunk[: 4096 - len(head)]
        text = carry + chunk
        cut = text.rfind(b"\n") + 1
        for m in _CREATE_SCHEMA.finditer(text, 0, cut):
            schemas.add(_unquote(m.group(1)))
        carry = text[cut:][-4096:]
        tail = (tail + chunk)[-4096:]
    if _PG_HEADER not in head:
        raise BadRequest("not a PostgreSQL plain SQL dump (no '-- PostgreSQL database dump' "
                         "header)", code="invalid_upload")
    if _PG_FOOTER not in tail:
        raise BadRequest("the PostgreSQL dump is incomplete (no 'dump complete' footer): it "
                         "was cut off", code="invalid_upload")
    return {"raw_bytes": size, "schemas": sorted(schemas), "tool": "pg_dump (uploaded)"}


def check_sqlite_file(path: Path) -> None:
    """Blocking: raise unless `path` is an SQLite database that passes integrity checks."""
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise ValueError("not an SQLite database (bad header)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if result != ["ok"]:
            raise ValueError("integrity_check: " + "; ".join(result[:5]))
        bad_fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        if bad_fk:
            raise ValueError(f"foreign_key_check found {len(bad_fk)} violation(s)")
    except sqlite3.DatabaseError as exc:
        raise ValueError(str(exc)) from None
    finally:
        conn.close()



def validate_sqlite(path: Path, compressed: bool) -> dict[str, Any]:
    """A whole SQLite database file that passes integrity and foreign-key checks."""
    with tempfile.TemporaryDirectory(prefix="safehold-upload-") as tmp:
        plain = Path(tmp) / "upload.db"
        size = 0
        with open(plain, "wb") as out:
            for chunk in plain_chunks(path, compressed):
                size += len(chunk)
                out.write(chunk)
        try:
            check_sqlite_file(plain)
        except ValueError as exc:
            raise BadRequest(f"not a sound SQLite database: {exc}", code="invalid_upload") \
                from None
    return {"raw_bytes": size, "tool": "sqlite3 (uploaded)"}


_MY_HEADERS = (b"-- MariaDB dump", b"-- MySQL dump")
_MY_FOOTER = b"-- Dump completed"


def validate_mysql(path: Path, compressed: bool) -> dict[str, Any]:
    """A complete mariadb-dump/mysqldump SQL file: its header first, `Dump completed` last."""
    size, head, tail = 0, b"", b""
    for chunk in plain_chunks(path, compressed):
        size += len(chunk)
        if len(head) < 4096:
            head += chunk[: 4096 - len(head)]
        tail = (tail + chunk)[-4096:]
    if not any(h in head for h in _MY_HEADERS):
        raise BadRequest("not a MariaDB/MySQL dump (no '-- MariaDB dump' or '-- MySQL dump' "
                         "header)", code="invalid_upload")
    if _MY_FOOTER not in tail:
        raise BadRequest("the MySQL dump is incomplete (no '-- Dump completed' footer): it "
                         "was cut off", code="invalid_upload")
    return {"raw_bytes": size, "tool": "mysqldump (uploaded)"}


def validate_redis(path: Path, compressed: bool) -> dict[str, Any]:
    """A RESP stream of SELECT and RESTORE commands (what Safehold's Redis backups hold)."""
    try:
        first = next(plain_chunks(path, compressed), b"")
    except PipelineError as exc:
        raise BadRequest(f"not a valid backup: {exc.message}", code="invalid_upload") from None
    if first.startswith(b"REDIS"):
        raise BadRequest("this is an RDB snapshot: restore it by placing it as the server's "
                         "dump.rdb (see the README); uploads take RESP backups",
                         code="invalid_upload")
    reader = RespReader()
    size, keys, databases = 0, 0, {0}
    try:
        for chunk in plain_chunks(path, compressed):
            size += len(chunk)
            for cmd in reader.feed(chunk):
                name = cmd[0].upper()
                if name == b"SELECT" and len(cmd) == 2 and cmd[1].isdigit():
                    databases.add(int(cmd[1]))
                elif name == b"RESTORE" and len(cmd) >= 4:
                    keys += 1
                else:
                    raise BadRequest(f"unexpected command {name[:30]!r} in a Redis backup",
                                     code="invalid_upload")
        reader.finish()
    except (ValueError, PipelineError) as exc:
        raise BadRequest(f"not a RESP Redis backup: {exc}", code="invalid_upload") from None
    if keys == 0 and size == 0:
        raise BadRequest("the Redis backup is empty", code="invalid_upload")
    return {"raw_bytes": size, "format": "resp", "databases": sorted(databases),
            "counts": {"keys": keys}, "tool": "RESP (uploaded)"}


VALIDATORS: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "postgresql": validate_postgresql,
    "sqlite": validate_sqlite,
    "mysql": validate_mysql,
    "redis": validate_redis,
}


def validate(engine: str, path: Path, compressed: bool) -> dict[str, Any]:
    validator = VALIDATORS.get(engine)
    if validator is None:
        raise BadRequest(f"uploads for {engine} targets are not supported yet",
                         code="upload_unsupported")
    try:
        return validator(path, compressed)
    except PipelineError as exc:  # bad or truncated gzip
        raise BadRequest(f"the upload is not a valid backup: {exc.message}",
                         code="invalid_upload") from None
