"""MySQL/MariaDB drills and exact counts: rows counted from the dump's INSERT tuples as it
passes (`InsertRows`), the scratch database a drill restores into (events left out)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pymysql

from shared.config import TargetConfig
from shared.errors import EngineError
from worker.engines import Drill, drill_name, stale_drills
from worker.engines.my_connection import (
    conn_params,
    connect,
    current_account,
    query,
    quote,
    unquote_name,
)


class InsertRows:
    r"""Exact row counts of a mysqldump / mariadb-dump, taken from the stream as it is
    dumped: the tuples of every `INSERT INTO `t` [(cols)] VALUES (…),(…);` statement of a
    table's data section (after `-- Dumping data for table`, before `UNLOCK TABLES`).
    Outside string literals a value holds no parenthesis (numbers, NULL, 0x… with
    --hex-blob), so each `(` there opens one row; string literals are skipped with their
    backslash escapes, across chunk edges, at C speed. Both layouts are read: MySQL's one
    line per statement and MariaDB 10.11's one line per row (where rows are counted as line
    starts, as a dumped string never holds a raw newline). Nothing of a row is kept."""

    _DATA = b"-- Dumping data for table "
    _HEADER = re.compile(rb"INSERT INTO (`(?:[^`]|``)*`) (?:\((?:[^`)]|`(?:[^`]|``)*`)*\) )?"
                         rb"VALUES")
    _STRING_BODY = re.compile(rb"[^'\\]*(?:\\.[^'\\]*)*", re.S)
    _NAME = re.compile(rb"`(?:[^`]|``)*`")
    _STRING = re.compile(rb"'[^'\\]*(?:\\.[^'\\]*)*'", re.S)
    _VALUES_RUN = re.compile(rb"[^';]*(?:'[^'\\]*(?:\\.[^'\\]*)*'[^';]*)*", re.S)
    _LINE_MAX = 65536  # a line start is kept across chunks up to this many bytes

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._table: str | None = None  # inside this table's VALUES
        self._in_string = False
        self._row_per_line = False  # mariadb-dump 10.11+: "VALUES\n(…),\n(…);"
        self._armed = False
        self._tail = b"\n"

    def feed(self, data: bytes) -> None:
        buf = self._tail + data
        self._tail = b""
        pos, n = 0, len(buf)
        while pos < n:
            if self._in_string:
                body = self._STRING_BODY.match(buf, pos)
                assert body is not None  # the pattern matches the empty string
                end = body.end()
                if end < n and buf[end] == 0x27:  # the closing quote
                    self._in_string = False
                    pos = end + 1
                    continue
                self._tail = buf[end:]  # "" or a lone backslash escaping the next byte
                return
            if self._table is not None and self._row_per_line:
                # a raw newline never occurs inside a dumped string: each "\n(" is a row
                # and the first ";\n" ends the statement (at C speed, no string parsing)
                stop = buf.find(b";\n", pos)
                self.counts[self._table] += buf.count(b"\n(", pos, n if stop < 0 else stop)
                if stop < 0:
                    self._tail = buf[-1:]  # a "\n(" or ";\n" may straddle the edge
                    return
                self._table = None
                pos = stop + 1
                continue
            if self._table is not None:
                # values up to the statement's `;`, or up to a string the chunk cuts
                values = self._VALUES_RUN.match(buf, pos)
                assert values is not None  # the pattern matches the empty string
                end = values.end()
                run = buf[pos:end]
                if b"'" in run:
                    run = self._STRING.sub(b"", run)
                self.counts[self._table] += run.count(b"(")
                if end == n:
                    return
                if buf[end] == 0x27:
                    self._in_string = True
                else:
                    self._table = None
                pos = end + 1
                continue
            i = buf.find(b"\n", pos)
            if i < 0:
                return  # mid-line: the next line start is in a later chunk
            if n - i <= len(self._DATA):
                self._tail = buf[i:]  # too little to tell what the line is
                return
            # (a quoted name may hold a newline: headers are matched across lines, bounded)
            bound = min(n, i + 1 + self._LINE_MAX)
            if self._armed and buf.startswith(b"INSERT INTO ", i + 1):
                h = self._HEADER.match(buf, i + 1, bound)
                if h is None and bound == n and n - i < self._LINE_MAX:
                    self._tail = buf[i:]  # the header continues in the next chunk
                    return
                if h and h.end() < n:
                    self._table = unquote_name(h.group(1).decode("utf-8", "replace"))
                    self.counts.setdefault(self._table, 0)
                    pos = h.end()
                    self._row_per_line = buf[pos] == 0x0A
                    continue
                if h:
                    self._tail = buf[i:]  # the layout is told by the next byte
                    return
            elif buf.startswith(self._DATA, i + 1):
                h = self._NAME.match(buf, i + 1 + len(self._DATA), bound)
                cut = h is None or h.end() == n or buf[h.end()] == 0x60  # "``" may go on
                if cut and bound == n and n - i < self._LINE_MAX:
                    self._tail = buf[i:]
                    return
                self._armed = True
                if h:
                    self.counts.setdefault(unquote_name(h.group().decode("utf-8", "replace")), 0)
            elif buf.startswith((b"-- ", b"UNLOCK TABLES", b"DELIMITER"), i + 1):
                self._armed = False
            pos = i + 1

    def result(self) -> dict[str, Any]:
        return {"exact_counts": self.counts, "exact_count_kind": "rows"}


_NEXT_SECTION = re.compile(rb"\n--\n-- Dumping routines for database |\n-- Dump completed")


_SECTION_MAX = len(b"\n--\n-- Dumping routines for database ")


class MySQLDrill(Drill):
    """Restore drills: a `safehold_drill_…` database on the same server (the target's user
    needs CREATE and DROP on it), exact rows per table counted there, dropped afterwards.
    Compared with the rows counted in the dump stream (`InsertRows`)."""

    skipped = "events (a restored event would run against the scratch copy, or beyond it)"

    async def restore_filter(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The dump without its events section: with the event scheduler on (MySQL 8's
        default) a restored event runs at once, and its body may name other databases."""
        start, tail, skipping = b"\n-- Dumping events for database ", b"", False
        async for data in chunks:
            buf, out, pos = tail + data, [], 0
            while True:
                if not skipping:
                    i = buf.find(start, pos)
                    if i < 0:
                        keep = max(pos, len(buf) - len(start) + 1)
                        out.append(buf[pos:keep])
                        tail = buf[keep:]
                        break
                    out.append(buf[pos:i + 1])
                    skipping, pos = True, i + 1
                else:
                    m = _NEXT_SECTION.search(buf, pos)
                    if m is None:
                        tail = buf[max(pos, len(buf) - _SECTION_MAX + 1):]
                        break
                    skipping, pos = False, m.start() + 1
            if out:
                yield b"".join(out)
        if tail and not skipping:
            yield tail

    async def sweep(self, target: TargetConfig, max_age: float) -> list[str]:
        """Drop scratch databases a killed drill left behind (older than any drill runs)."""
        async with connect(target) as conn:
            names = [r[0] for r in await query(
                conn, "SHOW DATABASES LIKE 'safehold\\_drill\\_%'")]
            stale = stale_drills(names, max_age)
            for name in stale:
                await query(conn, f"DROP DATABASE IF EXISTS {quote(name)}")
        return stale

    @asynccontextmanager
    async def scratch(self, target: TargetConfig) -> AsyncIterator[TargetConfig]:
        """A scratch database the target's user may load a dump into: created, then proven
        with what every dump's load does (a table made, keys disabled, locked, a row
        written, dropped). A user that may create it but not fill it would otherwise fail
        the load, and the drill would call a good backup bad: it is `drill_unavailable`
        (not run), with the exact grant."""
        name = drill_name()
        self.last_scratch = f"database {name}"
        async with connect(target) as conn:
            fix = f"GRANT ALL ON `safehold\\_drill\\_%`.* TO {await current_account(conn)}"
            try:
                await query(conn, f"CREATE DATABASE {quote(name)}")
            except pymysql.err.MySQLError as exc:
                raise EngineError(
                    f"the drill could not create a scratch database ({exc.args[-1]}): {fix}",
                    code="drill_unavailable") from None
            probe = f"{quote(name)}.`safehold_probe`"
            try:
                for sql in (f"CREATE TABLE {probe} (i int, KEY k (i))",
                            f"ALTER TABLE {probe} DISABLE KEYS", f"LOCK TABLES {probe} WRITE",
                            f"INSERT INTO {probe} VALUES (1)", "UNLOCK TABLES",
                            f"DROP TABLE {probe}"):
                    await query(conn, sql)
            except pymysql.err.MySQLError as exc:
                with contextlib.suppress(pymysql.err.MySQLError):  # (may lack DROP too)
                    await query(conn, "UNLOCK TABLES")
                    await query(conn, f"DROP DATABASE IF EXISTS {quote(name)}")
                raise EngineError(
                    f"the drill may create its scratch database but not load a dump into "
                    f"it ({exc.args[-1]}): {fix}", code="drill_unavailable") from None
        u = urlsplit(target.url)
        try:
            yield replace(target, url=u._replace(path=f"/{name}").geturl())
        finally:
            async with connect(target) as conn:
                await query(conn, f"DROP DATABASE IF EXISTS {quote(name)}")

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        db = conn_params(target)["database"]
        async with connect(target) as conn:
            tables = await query(
                conn, "SELECT table_name FROM information_schema.tables WHERE "
                "table_schema = %s AND table_type = 'BASE TABLE'", db)
            return {t[0]: int((await query(
                conn, f"SELECT COUNT(*) FROM {quote(t[0])}"))[0][0]) for t in tables}

    async def check(self, target: TargetConfig, sql: str) -> bool:
        async with connect(target) as conn:
            await query(conn, "START TRANSACTION READ ONLY")
            try:
                rows = await query(conn, sql)
            finally:
                await query(conn, "ROLLBACK")
        return bool(rows and rows[0][0])
