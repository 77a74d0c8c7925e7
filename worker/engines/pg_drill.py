"""PostgreSQL drills and exact counts: rows counted from the dump stream as it passes
(`CopyRows`), and the scratch database a drill restores into."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from shared.config import TargetConfig
from shared.errors import (
    EngineError,
)
from worker.engines import Drill, drill_name, stale_drills
from worker.engines.pg_connection import SYSTEM_SCHEMAS, conn_params, connect, quote_ident


class CopyRows:
    r"""Exact row counts of a plain pg_dump, taken from the stream as it is dumped: the lines
    of each table-data `COPY … FROM stdin;` block up to its `\.` (C-speed find/count; a
    block's rows are never kept, so a 1 GiB value costs one pass). Only a COPY header that
    follows pg_dump's `-- Data for Name: …; Type: TABLE DATA` comment counts: the same text
    inside a function body or a comment does not."""

    _MARK = b"\n-- Data for Name: "

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, int] = {}  # bytes of each table's COPY data, as dumped
        self._table: str | None = None
        self._armed = False  # a TABLE DATA comment was seen: the next COPY header is data
        self._tail = b"\n"

    def feed(self, data: bytes) -> None:
        buf = self._tail + data
        pos = 0
        while True:
            if self._table is not None:
                k = buf.find(b"\n\\.\n", pos)
                if k < 0:
                    keep = max(pos, len(buf) - 3)  # a terminator may straddle the edge
                    self.counts[self._table] += buf.count(b"\n", pos, keep)
                    self.sizes[self._table] += keep - pos
                    self._tail = buf[keep:]
                    return
                self.counts[self._table] += buf.count(b"\n", pos, k)
                self.sizes[self._table] += k - pos
                self._table = None
                pos = k + 3
                continue
            if not self._armed:
                i = buf.find(self._MARK, pos)
                if i < 0:
                    self._tail = buf[max(pos, len(buf) - len(self._MARK)):]
                    return
                j = buf.find(b"\n", i + 1)
                if j < 0:
                    self._tail = buf[i:]
                    return
                self._armed = b"Type: TABLE DATA;" in buf[i:j]
                pos = j
                continue
            i = buf.find(b"\nCOPY ", pos)
            nxt = buf.find(b"\n-- ", pos)  # the next section comes first: no data here
            if 0 <= nxt < i or i < 0:
                if nxt >= 0 and (i < 0 or nxt < i):
                    self._armed = False
                    pos = nxt
                    continue
                self._tail = buf[max(pos, len(buf) - 8):]
                return
            j = buf.find(b"\n", i + 1)
            if j < 0:
                self._tail = buf[i:]
                return
            header = buf[i + 1:j]
            self._armed = False
            if header.endswith(b" FROM stdin;"):
                self._table = copy_table(header[5:].decode("utf-8", "replace"))
                self.counts[self._table] = 0
                self.sizes[self._table] = 0
            pos = j

    def result(self) -> dict[str, Any]:
        return {"exact_counts": self.counts, "exact_count_kind": "rows",
                "exact_sizes": self.sizes}


def copy_table(rest: str) -> str:
    """The (quoted) table name at the start of a COPY header's remainder."""
    out, quoted, i = [], False, 0
    while i < len(rest):
        c = rest[i]
        if c == '"':
            if quoted and rest[i + 1:i + 2] == '"':
                out.append('""')
                i += 2
                continue
            quoted = not quoted
        elif c == " " and not quoted:
            break
        out.append(c)
        i += 1
    return "".join(out)


async def drop_scratch(target: TargetConfig, scratch: TargetConfig, name: str) -> None:
    """Drop a drill's database: detach any subscription the dump brought (they block DROP
    DATABASE), then DROP … WITH (FORCE), or end its sessions first before PostgreSQL 13."""
    with contextlib.suppress(Exception):
        async with connect(scratch) as conn:
            for (sub,) in await conn.fetch(
                    "SELECT quote_ident(subname) FROM pg_subscription WHERE subdbid = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"):
                await conn.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
                await conn.execute(f"ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)")
                await conn.execute(f"DROP SUBSCRIPTION {sub}")
    async with connect(target) as conn:
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        except asyncpg.PostgresSyntaxError:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = $1", name)
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}")



class PostgreSQLDrill(Drill):
    """Restore drills: a scratch database on the target's server (the target's role needs
    CREATEDB), exact row counts of every table, user checks, dropped afterwards."""

    async def sweep(self, target: TargetConfig, max_age: float) -> list[str]:
        """Drop scratch databases a killed drill left behind (older than any drill runs)."""
        async with connect(target) as conn:
            names = [r[0] for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'safehold\\_drill\\_%'")]
        stale = stale_drills(names, max_age)
        for name in stale:
            u = urlsplit(target.url)
            await drop_scratch(target, replace(target, url=u._replace(path=f"/{name}")
                                                .geturl()), name)
        return stale

    @asynccontextmanager
    async def scratch(self, target: TargetConfig) -> AsyncIterator[TargetConfig]:
        name = drill_name()
        self.last_scratch = f"database {name}"
        async with connect(target) as conn:
            # owned like the target's database: a backup's objects in `public` may belong
            # to the database owner, who needs CREATE there to own them (pg_database_owner)
            owner = await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                        "WHERE datname = current_database()")
            try:
                try:
                    await conn.execute(f"CREATE DATABASE {quote_ident(name)} OWNER "
                                       f"{quote_ident(owner)}")
                except asyncpg.InsufficientPrivilegeError:  # not a member of that owner
                    await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
            except asyncpg.PostgresError as exc:
                raise EngineError(
                    f"the drill could not create a scratch database ({exc}); grant CREATEDB "
                    f"to {conn_params(target)['user']} or run drills against a scratch server",
                    code="drill_unavailable") from None
        u = urlsplit(target.url)
        scratch = replace(target, url=u._replace(path=f"/{name}").geturl())
        try:
            yield scratch
        finally:
            await drop_scratch(target, scratch, name)

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        async with connect(target) as conn:
            rows = await conn.fetch(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN "
                f"{SYSTEM_SCHEMAS} AND n.nspname NOT LIKE 'pg_temp%'")
            out = {}
            for r in rows:
                qualified = f"{quote_ident(r['nspname'])}.{quote_ident(r['relname'])}"
                out[await conn.fetchval("SELECT format('%I.%I', $1::text, $2::text)",
                                        r["nspname"], r["relname"])] = \
                    await conn.fetchval(f"SELECT count(*) FROM ONLY {qualified}")
            return out

    async def check(self, target: TargetConfig, sql: str) -> bool:
        async with connect(target) as conn, conn.transaction(readonly=True):
            return bool(await conn.fetchval(sql))
