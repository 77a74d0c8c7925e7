"""Neo4j Cypher exports: statements the export writes, nothing that reaches files or procedures."""

from __future__ import annotations

from collections.abc import Iterator

from shared.errors import BadRequest
from shared.formats.common import FileFacts, Unsafe
from shared.formats.cypher import StatementSplitter, check_command, check_statement


def validate_neo4j(chunks: Iterator[bytes]) -> FileFacts:
    """A UTF-8 Cypher script of the statement shapes the exporters write."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    splitter = StatementSplitter()
    size, count = 0, 0

    def check(statements: list[str]) -> None:
        nonlocal count
        for stmt in statements:
            count += 1
            line = splitter.lines.pop(0)
            if (why := check_statement(stmt)) is not None:
                raise Unsafe(f"line {line}: statement {count} refused ({why}): {stmt[:60]!r}")
        while splitter.commands:
            command = splitter.commands.pop(0)
            if (why := check_command(command)) is not None:
                raise Unsafe(f"after statement {count}: {why} refused")

    try:
        for chunk in chunks:
            if b"\0" in chunk:
                raise Unsafe("a NUL byte in the Cypher script")
            size += len(chunk)
            check(splitter.feed(decoder.decode(chunk)))
        check(splitter.feed(decoder.decode(b"", final=True), final=True))
    except UnicodeDecodeError:
        raise BadRequest("the Cypher script is not UTF-8", code="invalid_upload") from None
    if count == 0:
        raise BadRequest("the Cypher script holds no statement", code="invalid_upload")
    return {"raw_bytes": size, "counts": {"statements": count}, "tool": "cypher (uploaded)"}
