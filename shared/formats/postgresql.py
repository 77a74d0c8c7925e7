"""PostgreSQL plain SQL dumps: the pg_dump grammar, checked by the PgScriptGuard lexer."""

from __future__ import annotations

from collections.abc import Iterator

from shared.errors import BadRequest
from shared.formats.common import FileFacts
from shared.formats.pgscript import PgScriptGuard

_PG_CUSTOM_MAGIC = b"PGDMP"

def validate_postgresql(chunks: Iterator[bytes]) -> FileFacts:
    """A complete plain-SQL pg_dump (footer present) with no psql meta-commands, no
    transaction control and no COPY other than FROM stdin (see `shared.formats.pgscript`)."""
    guard = PgScriptGuard()
    size = 0
    for chunk in chunks:
        if size == 0 and chunk.startswith(_PG_CUSTOM_MAGIC):
            raise BadRequest("this is a pg_dump custom-format archive; upload a plain SQL dump "
                             "(pg_dump --format=plain)", code="invalid_upload")
        if size == 0 and b"-- PostgreSQL database dump" not in chunk[:4096]:
            raise BadRequest("not a PostgreSQL plain SQL dump (no '-- PostgreSQL database "
                             "dump' header)", code="invalid_upload")
        size += len(chunk)
        guard.feed(chunk)
    if size == 0:
        raise BadRequest("the PostgreSQL dump is empty", code="invalid_upload")
    guard.finish()
    return {"raw_bytes": size, "tool": "pg_dump (uploaded)"}
