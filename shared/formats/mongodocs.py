"""Documents of one collection read from a MongoDB backup's tar stream (issue 25's preview:
"which backup still has customer 4711?"), without restoring anything.

Only the collection's `<db>/<collection>.bson` entry is decoded, document by document (each
at most 16 MiB, as MongoDB's own limit); every member name is checked as a restore checks
it. A column per top-level field, in the order first met; values are strings as stored,
everything else relaxed extended JSON. `where` compares a field's value shown that way
(`_id=64b7…`, `n=4711`). Reading stops as soon as `limit` documents matched."""

from __future__ import annotations

import struct

import bson
from bson import json_util
from bson.errors import BSONError

from shared.errors import PipelineError
from shared.formats.mongodb import check_mongo_member
from shared.formats.pgrows import MAX_RESULT, MAX_VALUE
from shared.formats.tarstream import TarReader

MAX_DOC = 16 << 20
_JSON = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED)


def _shown(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json_util.dumps(value, json_options=_JSON)


class DocReader:
    """Feed plain chunks of the tar; `done` once `limit` documents matched or the
    collection's entry ended."""

    def __init__(self, collection: str, where: tuple[str, str] | None, limit: int) -> None:
        self.wanted = f"{collection.split('.', 1)[0]}/{collection.split('.', 1)[1]}.bson"
        self.where, self.limit = where, limit
        self.columns: list[str] = []
        self.rows: list[list[str | None]] = []
        self.docs: list[dict[str, object]] = []
        self.scanned = 0
        self.truncated = False
        self.done = False
        self.found = False
        self._tar = TarReader()
        self._in = False
        self._buf = bytearray()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        self._tar.push(chunk)
        while not self.done and (event := self._tar.next_event()) is not None:
            kind, payload = event
            if kind == "file" and isinstance(payload, tuple):
                check_mongo_member(payload[0])
                self._in = payload[0] == self.wanted
                self.found |= self._in
            elif kind == "data" and self._in and isinstance(payload, bytes):
                self._buf += payload
                self._documents()
            elif kind == "end" and self._in:
                if self._buf:
                    raise PipelineError("the BSON file ends inside a document",
                                        code="corrupt_backup")
                self._in = False
                self._finish_rows()
                self.done = True  # the collection's entry is read whole
            elif kind == "eof":
                break

    def finish(self) -> None:
        if not self.done:
            self._finish_rows()
            self.done = True

    def _documents(self) -> None:
        at = 0
        while len(self._buf) - at >= 4 and not self.done:
            length = struct.unpack_from("<i", self._buf, at)[0]
            if not 5 <= length <= MAX_DOC:
                raise PipelineError("corrupt BSON in the backup", code="corrupt_backup")
            if len(self._buf) - at < length:
                break
            try:
                doc = bson.decode(bytes(self._buf[at:at + length]))
            except (BSONError, ValueError, TypeError) as exc:
                raise PipelineError(f"corrupt BSON in the backup ({exc})",
                                    code="corrupt_backup") from None
            at += length
            self.scanned += 1
            if self.where is None or (self.where[0] in doc and
                                      _shown(doc[self.where[0]]) == self.where[1]):
                self._keep(doc)
        del self._buf[:at]

    def _keep(self, doc: dict[str, object]) -> None:
        for key in doc:
            if key not in self.columns:
                self.columns.append(key)
        self.docs.append(doc)
        self._size += len(bson.encode(doc))
        if len(self.docs) >= self.limit or self._size > MAX_RESULT:
            self._finish_rows()
            self.done = True

    def _finish_rows(self) -> None:
        """The documents kept as rows of the columns met (a missing field: null)."""
        self.rows = []
        for doc in self.docs:
            row: list[str | None] = []
            for c in self.columns:
                v = _shown(doc.get(c))
                if v is not None and len(v) > MAX_VALUE:
                    v, self.truncated = v[:MAX_VALUE] + "…", True
                row.append(v)
            self.rows.append(row)
