"""Rows of one table read from a plain pg_dump stream (issue 25's preview: "which backup
still has customer 4711?"), without restoring anything.

The stream goes through the same guard and section cut as a one-table restore (a header
inside a function body is no header; only the table's own `TABLE DATA` section is read),
then its COPY block is decoded (text format: tab-separated, `\\N` for NULL, backslash
escapes) row by row. Reading stops as soon as `limit` matching rows were found; a row
longer than MAX_ROW is counted, never held."""

from __future__ import annotations

import re

from shared.errors import Unprocessable
from shared.formats.pgscript import PgScriptGuard
from shared.formats.pgtables import Rel, Selection, TableCut

MAX_ROW = 8 << 20  # one COPY line held at most
MAX_VALUE = 2000  # characters of one value shown
MAX_FIELDS = 1600  # PostgreSQL's own limit of columns in a table
MAX_RESULT = 4 << 20  # characters of values in one answer
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.S)
_PLAIN = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_COLUMN = re.compile(r'"(?:[^"]|"")*"|[^,\s]+')


def decode_field(raw: bytes) -> str | None:
    if raw == b"\\N":
        return None
    if b"\\" in raw:
        def one(m: re.Match[bytes]) -> bytes:
            if m.group(1):
                return bytes([int(m.group(1), 8) & 0xFF])
            if m.group(2):
                return bytes([int(m.group(2), 16)])
            return _PLAIN.get(m.group(3), m.group(3))
        raw = _ESCAPE.sub(one, raw)
    return raw.decode("utf-8", "replace")


def copy_columns(header: bytes) -> list[str]:
    """The column names of `COPY s.t (a, "B c") FROM stdin;`."""
    text = header.decode("utf-8", "replace")
    inner = text[text.find("(") + 1:text.rfind(")")] if "(" in text else ""
    return [c[1:-1].replace('""', '"') if c.startswith('"') else c
            for c in _COLUMN.findall(inner)]


class RowReader:
    """Feed plain chunks; `done` once `limit` rows matched or the table's data ended."""

    def __init__(self, table: Rel, where: tuple[str, str] | None, limit: int) -> None:
        self.cut = TableCut(Selection(data={table}, create=set()))
        self.guard = PgScriptGuard(cut=self.cut)
        self.where, self.limit = where, limit
        self.columns: list[str] | None = None
        self.rows: list[list[str | None]] = []
        self.scanned = 0
        self.truncated = False
        self.done = False
        self._at: int | None = None  # the where column's index
        self._buf = bytearray()
        self._skipping = False
        self._copy = False
        self._shown = 0

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        self._lines(self.guard.feed(chunk))

    def finish(self) -> None:
        """The stream ended before the table's data did: it lacks the table (raises)."""
        if not self.done:
            self._lines(self.guard.finish())
            self.done = True

    def _lines(self, out: bytes) -> None:
        start = 0
        while not self.done:
            nl = out.find(b"\n", start)
            if nl < 0:
                rest = out[start:]
                if self._skipping:
                    return
                self._buf += rest
                if len(self._buf) > MAX_ROW:  # counted, never held
                    self._buf.clear()
                    self._skipping = True
                return
            line = bytes(self._buf) + out[start:nl] if self._buf else out[start:nl]
            self._buf.clear()
            start = nl + 1
            if self._skipping:
                self._skipping = False
                if self._copy:
                    self.scanned += 1
                    self.truncated = True
                continue
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not self._copy:
            if line.startswith(b"COPY ") and line.endswith(b" FROM stdin;"):
                self.columns = copy_columns(line)
                self._copy = True
                if self.where is not None:
                    if self.where[0] not in self.columns:
                        raise Unprocessable(
                            f"the table has no column {self.where[0]!r} (it has: "
                            + ", ".join(self.columns)[:500] + ")", code="column_missing")
                    self._at = self.columns.index(self.where[0])
            return
        if line == b"\\.":
            self.done = True
            return
        self.scanned += 1
        if line.count(b"\t") >= MAX_FIELDS:  # no table has that many columns: not shown
            self.truncated = True
            return
        fields = line.split(b"\t")
        if self._at is not None and self.where is not None and (
                self._at >= len(fields) or decode_field(fields[self._at]) != self.where[1]):
            return
        row = [decode_field(f) for f in fields]
        for i, v in enumerate(row):
            if v is not None and len(v) > MAX_VALUE:
                row[i] = v[:MAX_VALUE] + "…"
                self.truncated = True
        self.rows.append(row)
        self._shown += sum(len(v) for v in row if v is not None)
        if len(self.rows) >= self.limit or self._shown > MAX_RESULT:
            self.truncated = self.truncated or self._shown > MAX_RESULT
            self.done = True
