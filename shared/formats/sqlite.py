"""SQLite database files: a real database, without what could reach outside it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from shared import scratch
from shared.errors import BadRequest
from shared.formats.common import FileFacts


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


def validate_sqlite(chunks: Iterator[bytes]) -> FileFacts:
    """A whole SQLite database file that passes integrity and foreign-key checks. The plain
    file is written to a temp directory, never past the inflation bound of `chunks`."""
    with scratch.private_dir("upload") as tmp:
        plain = scratch.private_file(tmp, "upload.db")
        size = 0
        with open(plain, "wb") as out:
            for chunk in chunks:
                if size == 0 and not chunk.startswith(b"SQLite format 3\x00"):
                    raise BadRequest("not a sound SQLite database: not an SQLite database "
                                     "(bad header)", code="invalid_upload")
                size += len(chunk)
                out.write(chunk)
        try:
            check_sqlite_file(plain)
        except ValueError as exc:
            raise BadRequest(f"not a sound SQLite database: {exc}", code="invalid_upload") \
                from None
    return {"raw_bytes": size, "tool": "sqlite3 (uploaded)"}
