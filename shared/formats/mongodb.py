"""MongoDB backups (a tar of mongodump's layout): names, metadata and BSON checked."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from typing import Any

from shared.errors import BadRequest
from shared.formats.common import FileFacts, Unsafe, sized
from shared.formats.tarstream import TarReader

_MONGO_NAME = re.compile(r"^[^/\\. \"$\0][^/\\ \"$\0]{0,63}\Z")
_MONGO_COLL = re.compile(r"^[^$\0/][^$\0/]{0,200}\Z")
MONGO_SYSTEM_DBS = frozenset({"admin", "local", "config"})


def check_mongo_member(name: str) -> tuple[str, str, str] | None:
    """(db, collection, kind) of a mongodump-layout member; None for prelude.json; raises
    on anything else (other paths, system databases, `system.` collections)."""
    if name == "prelude.json":
        return None
    parts = name.split("/")
    kind = ""
    if len(parts) == 2:
        db, file = parts
        for suffix in (".metadata.json", ".bson"):
            if file.endswith(suffix):
                kind, coll = suffix, file[: -len(suffix)]
                break
    if not kind or not _MONGO_NAME.match(db) or not _MONGO_COLL.match(coll):
        raise Unsafe(f"tar member {name[:80]!r} is not in the mongodump layout "
                     "(<db>/<collection>.bson / .metadata.json)")
    if db in MONGO_SYSTEM_DBS or coll.startswith("system."):
        raise Unsafe(f"tar member {name[:80]!r}: system databases and collections are never "
                     "restored")
    return db, coll, kind


def check_mongo_metadata(name: str, raw: bytes) -> None:
    """Collection options and indexes only, in their documented shapes; no server-side
    JavaScript ($where, $function, $accumulator — JSON escapes decoded first) anywhere in
    validators, view pipelines or index filters, and no storage-engine configuration."""
    try:
        meta = json.loads(raw)
    except ValueError:
        raise BadRequest(f"{name}: metadata is not JSON", code="invalid_upload") from None
    if not isinstance(meta, dict) or set(meta) - {"options", "indexes", "uuid",
                                                  "collectionName", "type"}:
        raise Unsafe(f"{name}: unexpected metadata keys")
    options, indexes = meta.get("options", {}), meta.get("indexes", [])
    if not isinstance(options, dict) or not isinstance(indexes, list) or not all(
            isinstance(ix, dict) and isinstance(ix.get("key", {}), dict) for ix in indexes):
        raise BadRequest(f"{name}: options must be an object and indexes a list of objects",
                         code="invalid_upload")
    for key in _json_keys(meta):
        if key in ("$where", "$function", "$accumulator"):
            raise Unsafe(f"{name}: server-side JavaScript ({key}) is refused")
        if key == "storageEngine":
            raise Unsafe(f"{name}: storage-engine configuration is refused")


def _json_keys(value: object) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield from item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def tar_events(reader: TarReader, chunks: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    """Drive a TarReader from `chunks` until the end-of-archive block."""
    while True:
        event = reader.next_event()
        if event is None:
            chunk = next(chunks, None)
            if chunk is None:
                raise BadRequest("the tar stream ends early (cut off)", code="invalid_upload")
            reader.push(chunk)
            continue
        if event[0] == "eof":
            return
        yield event


class BsonCounter:
    """Counts documents in a BSON stream fed in pieces; refuses impossible lengths."""

    def __init__(self, name: str) -> None:
        self.name, self.count, self._buf = name, 0, bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        at = 0
        while len(self._buf) - at >= 4:
            length = struct.unpack_from("<i", self._buf, at)[0]
            if length < 5 or length > 48 << 20:
                raise BadRequest(f"{self.name}: document {self.count + 1} has an impossible "
                                 "length", code="invalid_upload")
            if len(self._buf) - at < length:
                break
            if self._buf[at + length - 1] != 0:
                raise BadRequest(f"{self.name}: document {self.count + 1} is malformed",
                                 code="invalid_upload")
            at += length
            self.count += 1
        del self._buf[:at]

    def finish(self) -> int:
        if self._buf:
            raise BadRequest(f"{self.name}: ends inside a document", code="invalid_upload")
        return self.count


def validate_mongodb(chunks: Iterator[bytes]) -> FileFacts:
    """A tar stream in mongodump's layout with well-formed BSON documents."""
    box = [0]
    counts: dict[str, int] = {}
    dbs: set[str] = set()
    events = tar_events(TarReader(), sized(chunks, box))
    for kind, payload in events:
        if kind != "file":
            continue
        name, size = payload
        where = check_mongo_member(name)
        if where is not None and where[2] == ".metadata.json" and size > 16 << 20:
            raise Unsafe(f"{name}: metadata larger than 16 MiB")
        meta, docs = bytearray(), BsonCounter(name)
        for kind, data in events:
            if kind == "end":
                break
            if where is None:
                continue
            if where[2] == ".metadata.json":
                meta += data
            else:
                docs.feed(data)
        if where is None:
            continue
        db, coll, suffix = where
        dbs.add(db)
        if suffix == ".metadata.json":
            check_mongo_metadata(name, bytes(meta))
        else:
            counts[f"{db}.{coll}"] = docs.finish()
    if not counts and box[0] == 0:
        raise BadRequest("the MongoDB backup is empty", code="invalid_upload")
    return {"raw_bytes": box[0], "counts": counts, "count_kind": "documents",
            "databases": sorted(dbs), "tool": "mongodump layout (uploaded)"}
