"""How Safehold reaches a PostgreSQL target: connection parameters from its URL, the `PG*`
environment of a client tool (the password only in `PGPASSWORD`, never argv), one asyncpg
connection, identifiers and literals quoted, the client tools' versions."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from shared.config import TargetConfig
from shared.errors import (
    EngineError,
)
from worker.engines import unreachable

SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema', 'pg_toast')"


def conn_params(target: TargetConfig) -> dict[str, Any]:
    u = urlsplit(target.url)
    q = parse_qs(u.query)
    return {
        # libpq's `?host=/socket/dir` (a scratch server's private socket) wins
        "host": q.get("host", [None])[0] or u.hostname or "127.0.0.1",
        "port": u.port or 5432,
        "user": unquote(u.username or "postgres"),
        "database": unquote(u.path.lstrip("/")) or unquote(u.username or "postgres"),
        "sslmode": q.get("sslmode", [None])[0],
    }


def tool_env(target: TargetConfig) -> dict[str, str]:
    c = conn_params(target)
    env = {"PGHOST": c["host"], "PGPORT": str(c["port"]), "PGUSER": c["user"],
           "PGDATABASE": c["database"], "PGCONNECT_TIMEOUT": "10",
           "PGAPPNAME": "safehold"}
    if c["sslmode"]:
        env["PGSSLMODE"] = c["sslmode"]
    if target.password is not None:
        env["PGPASSWORD"] = target.password.reveal()
    return env



def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def tool_major(tool: str) -> tuple[int, str]:
    """Major version of a client tool, e.g. (15, 'pg_dump (PostgreSQL) 15.19')."""
    try:
        proc = await asyncio.create_subprocess_exec(
            tool, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise EngineError(f"{tool} is not installed (install postgresql-client)",
                          code="tool_missing") from None
    out, _ = await proc.communicate()
    text = out.decode().strip()
    m = re.search(r"(\d+)(?:\.\d+)?", text)
    if not m:
        raise EngineError(f"cannot read the version of {tool}: {text!r}", code="tool_missing")
    return int(m.group(1)), text


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@asynccontextmanager
async def connect(target: TargetConfig) -> AsyncIterator[asyncpg.Connection]:
    c = conn_params(target)
    try:
        conn = await asyncpg.connect(
            host=c["host"], port=c["port"], user=c["user"], database=c["database"],
            password=target.password.reveal() if target.password else None,
            ssl=c["sslmode"] if c["sslmode"] not in (None, "disable") else False,
            timeout=10,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise unreachable(target, "PostgreSQL", exc,
                          f"{c['host']}:{c['port']}/{c['database']}") from None
    try:
        yield conn
    finally:
        await conn.close()
