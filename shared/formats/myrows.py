"""Rows of one table read from a plain mariadb-dump / mysqldump stream (issue 25's preview:
"which backup still has customer 4711?"), without restoring anything.

The stream goes through the same cut as a one-table restore (`mytables.MyTableCut`: only the
table's own sections, every statement checked), then the column names are read from its
`CREATE TABLE` and the rows from its `INSERT INTO … VALUES (…),(…);` statements (on one
line, or a row a line as MariaDB 10.11's dump writes them), value by value
(strings with the client's backslash escapes, `_binary '…'`, `0x…`, numbers, NULL).
Reading stops as soon as `limit` matching rows were found; an INSERT line longer than
MAX_LINE is refused, never held."""

from __future__ import annotations

import re

from shared.errors import PipelineError, Unprocessable
from shared.formats.mytables import MyTableCut
from shared.formats.pgrows import MAX_RESULT, MAX_VALUE

MAX_LINE = 64 << 20  # one INSERT line held at most (mariadb-dump: net_buffer_length)
_COLUMN = re.compile(rb"^  `((?:[^`]|``)+)` ")
_INSERT = re.compile(rb"^INSERT INTO `(?:[^`]|``)+` (?:\(([^)]*)\) )?VALUES ")
_VALUE = re.compile(rb"""NULL|(_binary\s*)?'((?:[^'\\]|\\.|'')*)'|0x([0-9A-Fa-f]*)|"""
                    rb"""[-+]?[0-9][0-9.eE+-]*|b'([01]*)'""", re.S)
_ESCAPES = {b"0": b"\0", b"b": b"\b", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"Z": b"\x1a"}
_ESCAPE = re.compile(rb"\\(.)|''", re.S)


def _unescape(raw: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        if m.group(0) == b"''":
            return b"'"
        c = m.group(1)
        return _ESCAPES.get(c, c)  # \\ \' \" and any other: the character itself
    return _ESCAPE.sub(one, raw) if b"\\" in raw or b"''" in raw else raw


def _shown(raw: bytes, binary: bool) -> str:
    try:
        text = raw.decode("utf-8") if not binary else "\\x" + raw.hex()
    except UnicodeDecodeError:
        text = "\\x" + raw.hex()
    return text


class MyRowReader:
    """Feed plain chunks; `done` once `limit` rows matched."""

    def __init__(self, table: str, where: tuple[str, str] | None, limit: int) -> None:
        self.cut = MyTableCut({table})
        self.where, self.limit = where, limit
        self.columns: list[str] = []
        self.rows: list[list[str | None]] = []
        self.scanned = 0
        self.truncated = False
        self.done = False
        self._in_create = False
        self._in_values = False  # an INSERT's rows go on on the next line
        self._partial = b""
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if not self.done:
            self._lines(self.cut.feed(chunk))

    def finish(self) -> None:
        if not self.done:
            self._lines(self.cut.finish())
            if self._partial:
                self._line(self._partial)

    def _lines(self, data: bytes) -> None:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            raise PipelineError("a line of the table's data longer than 64 MiB",
                                code="corrupt_backup")
        for line in lines:
            self._line(line)
            if self.done:
                return

    def _line(self, line: bytes) -> None:
        if line.startswith(b"CREATE TABLE "):
            self._in_create, self.columns = True, []
            return
        if self._in_create:
            if m := _COLUMN.match(line):
                self.columns.append(m.group(1).replace(b"``", b"`").decode("utf-8", "replace"))
            elif line.startswith(b")"):
                self._in_create = False
            return
        if self._in_values:
            self._tuples(line, 0)
            return
        if m := _INSERT.match(line.rstrip(b"\r") + b" "):
            if m.group(1):  # --complete-insert: the columns named on the line
                self.columns = [c.strip().strip(b"`").replace(b"``", b"`").decode(
                    "utf-8", "replace") for c in m.group(1).split(b",")]
            self._tuples(line, m.end())

    def _tuples(self, line: bytes, at: int) -> None:
        want = None
        if self.where is not None:
            if self.where[0] not in self.columns:
                raise Unprocessable(f"the table has no column {self.where[0]!r} (it has: "
                                    + ", ".join(self.columns)[:500] + ")",
                                    code="column_missing")
            want = self.columns.index(self.where[0])
        line = line.rstrip(b"\r")
        n = len(line)
        self._in_values = True
        while at < n and line[at:at + 1] == b"(":
            at += 1
            row: list[str | None] = []
            while True:
                m = _VALUE.match(line, at)
                if m is None:
                    raise PipelineError(f"a value of the table's rows cannot be read "
                                        f"({line[at:at + 20]!r})", code="corrupt_backup")
                at = m.end()
                text = m.group(0)
                if text == b"NULL":
                    row.append(None)
                elif m.group(2) is not None:
                    row.append(_shown(_unescape(m.group(2)), False))
                elif m.group(3) is not None:
                    row.append(_shown(bytes.fromhex(m.group(3).decode()), True))
                else:
                    row.append(text.decode())
                sep = line[at:at + 1]
                at += 1
                if sep == b")":
                    break
                if sep != b",":
                    raise PipelineError("the table's rows are not as the dump writes them",
                                        code="corrupt_backup")
            self.scanned += 1
            if want is None or self.where is None or (
                    want < len(row) and row[want] == self.where[1]):
                self._keep(row)
                if self.done:
                    return
            if line[at:at + 1] == b",":
                at += 1
            elif line[at:at + 1] == b";":
                self._in_values = False
                return
        if at < n:
            raise PipelineError("the table's rows are not as the dump writes them",
                                code="corrupt_backup")

    def _keep(self, row: list[str | None]) -> None:
        shown: list[str | None] = []
        for v in row:
            if v is not None and len(v) > MAX_VALUE:
                v, self.truncated = v[:MAX_VALUE] + "…", True
            shown.append(v)
        self._size += sum(len(v) for v in shown if v)
        self.rows.append(shown)
        if len(self.rows) >= self.limit or self._size > MAX_RESULT:
            self.done = True
