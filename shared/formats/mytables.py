"""The parts of a mariadb-dump / mysqldump script that belong to some named tables (issue
25's `tables` on MySQL/MariaDB).

The dump writes each table as two sections, `-- Table structure for table `t`` (DROP TABLE
IF EXISTS, CREATE TABLE) and `-- Dumping data for table `t`` (LOCK TABLES, INSERTs, UNLOCK
TABLES, then the table's triggers between DELIMITER lines). Only those of the named tables
pass, with the settings before the first section (character set, FOREIGN_KEY_CHECKS=0…).
A section comment counts only between statements, as the client splits them
(`mysqlscan.StatementStarts`, fed line by line): one inside a routine's body is text. Every
statement of a kept section must be about its table — DROP/CREATE TABLE, LOCK/UNLOCK TABLES,
ALTER TABLE … KEYS, INSERT INTO, CREATE TRIGGER … ON it, or a session setting — or the
restore is refused; a statement is checked before the line that ends it is passed on.
"""

from __future__ import annotations

import re

from shared.errors import BadRequest
from shared.formats.mysql import _normalized
from shared.formats.mysqlscan import StatementStarts

_HEADER = re.compile(rb"^-- (Table structure for table|Dumping data for table|"
                     rb"Temporary (?:table|view) structure for view|Final view structure for "
                     rb"view|Dumping events for database|Dumping routines for database) (.*)$")
_KEPT = (b"Table structure for table", b"Dumping data for table")
_SETTING = re.compile(rb"(?is)SET\s(?!\s*(?:GLOBAL|PERSIST|@@GLOBAL|@@PERSIST|PASSWORD|ROLE|"
                      rb"DEFAULT\s+ROLE)\b)")
HOLD_MAX = 1 << 20
_OPEN_ENDED = re.compile(rb"(?i)(?:INSERT\s+INTO|CREATE\s+TABLE|CREATE\s+(?:DEFINER\s*=\s*\S+\s+)?"
                         rb"TRIGGER)\s")


class RefusedStatement(BadRequest):
    code = "unsafe_backup"


def _forms(name: str) -> list[re.Pattern[bytes]]:
    t = rb"(?:`" + re.escape(name.encode()) + rb"`|" + re.escape(name.encode()) + \
        rb"(?![\w$]))"
    definer = rb"(?:DEFINER\s*=\s*\S+\s+)?"
    return [re.compile(rx, re.I | re.S) for rx in (
        rb"DROP\s+TABLE\s+IF\s+EXISTS\s+" + t + rb"\s*$",
        rb"CREATE\s+TABLE\s+" + t + rb"\s*\(",
        rb"LOCK\s+TABLES\s+" + t + rb"\s+WRITE\s*$",
        rb"UNLOCK\s+TABLES\s*$",
        rb"ALTER\s+TABLE\s+" + t + rb"\s+(?:DISABLE|ENABLE)\s+KEYS\s*$",
        rb"INSERT\s+INTO\s+" + t + rb"\s+(?:\([^)]*\)\s*)?VALUES\s*\(",
        rb"CREATE\s+" + definer + rb"TRIGGER\s+\S+\s+(?:BEFORE|AFTER)\s+\w+\s+ON\s+" + t +
        rb"\s+FOR\s+EACH\s+ROW\s")]


class LineStatements(StatementStarts):
    """StatementStarts fed whole lines, so the state between two lines is known."""

    def feed_line(self, line: bytes) -> None:
        data = self.carry + line
        at = self._scan(data, len(data))
        self.carry = data[at:]

    @property
    def between(self) -> bool:
        return self.state == b"" and not self.head.strip() and not self.carry


class LineFilter:
    """Bytes in, each whole line judged by `_line` (what it returns is passed on); the
    last line, without its newline, at `_rest()`."""

    _partial = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return b"".join(self._line(ln + b"\n") for ln in lines)

    def _rest(self) -> bytes:
        out = self._line(self._partial) if self._partial else b""
        self._partial = b""
        return out

    def _line(self, line: bytes) -> bytes:
        raise NotImplementedError


class MyTableCut(LineFilter):
    """Feed the dump's bytes; returns what the client may read. `tables`: plain names."""

    def __init__(self, tables: set[str]) -> None:
        self.tables = tables
        self.forms = {t: _forms(t) for t in tables}
        self.scan = LineStatements(self._statement)
        self.seen: set[str] = set()  # tables whose structure section came
        self.sent = False  # something of a named table was passed on
        self._table: str | None = None  # the kept section's table
        self._state = "preamble"  # preamble | keep | drop
        self._held: list[bytes] = []  # the preamble's statement under way
        self._held_size = 0
        self._verdict: bool | None = None  # the preamble statement that ended: pass it?

    def finish(self) -> bytes:
        out = self._rest()
        self.scan.finish()
        if missing := sorted(self.tables - self.seen):
            raise RefusedStatement("the backup holds no table " + ", ".join(missing),
                                   code="table_missing")
        return out

    def _line(self, line: bytes) -> bytes:
        if self.scan.between and line.startswith(b"-- "):
            m = _HEADER.match(line.rstrip(b"\r\n"))
            if m:
                name = m.group(2).strip()
                table = name[1:-1].decode("utf-8", "replace") if name.startswith(b"`") \
                    and name.endswith(b"`") else None
                self._held, self._held_size = [], 0
                if m.group(1) in _KEPT and table in self.tables:
                    self._state, self._table = "keep", table
                    if m.group(1) == _KEPT[0]:
                        self.seen.add(table)
                else:
                    self._state, self._table = "drop", None
        self.scan.feed_line(line)  # statements that end here are checked (may raise)
        if self._state == "keep":
            self.sent = True
            return line
        if self._state == "drop":
            return b""
        # the preamble: settings pass, anything else never does
        self._held.append(line)
        self._held_size += len(line)
        if self._held_size > HOLD_MAX:
            raise RefusedStatement("a statement of over 1 MiB before the first table")
        if self._verdict is None:
            return b""
        out = b"".join(self._held) if self._verdict else b""
        self._held, self._held_size, self._verdict = [], 0, None
        return out

    def _statement(self, head: bytes, line: int) -> None:
        text = _normalized(head)
        # only a statement's first bytes are seen: one that may go on past them is judged
        # by its start only where that start says all (a row insert, a definition)
        cut_short = self.scan.cut_short and not _OPEN_ENDED.match(text)
        if self._state == "preamble":
            self._verdict = bool(_SETTING.match(text)) and not cut_short
            return
        if self._state != "keep" or self._table is None:
            return
        if cut_short:
            raise RefusedStatement(f"line {line}: a statement of table {self._table}'s "
                                   f"section longer than its check reads; refused")
        if _SETTING.match(text):
            return
        if not any(f.match(text) for f in self.forms[self._table]):
            shown = text[:80].decode("utf-8", "replace")
            raise RefusedStatement(f"line {line}: a section of table {self._table} holds "
                                   f"{shown!r}, a statement about something else; refused")
