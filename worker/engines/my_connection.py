"""How Safehold reaches a MySQL/MariaDB target: connection parameters from its URL, the 0600
option file a client tool reads (the password never in argv), one aiomysql connection and
its queries, identifiers quoted, the client tools found and their guard flags."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql
import pymysql

from shared import scratch
from shared.config import TargetConfig
from shared.errors import EngineError
from worker.engines import unreachable


def conn_params(target: TargetConfig) -> dict[str, Any]:
    u = urlsplit(target.url)
    q = parse_qs(u.query)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": unquote(u.username or "root"),
        "database": unquote(u.path.lstrip("/")),
        "unix_socket": q.get("unix_socket", [None])[0],
    }


def option_value(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextmanager
def defaults_file(target: TargetConfig, *, charset: bool = True) -> Iterator[str]:
    """A private 0600 option file with the connection and password; removed afterwards
    (`charset`: with the client character set, which mariadb-binlog does not take)."""
    c = conn_params(target)
    lines = ["[client]", f"user={option_value(c['user'])}", f"host={c['host']}",
             f"port={c['port']}", *(["default-character-set=utf8mb4"] if charset else [])]
    if c["unix_socket"]:
        lines.append(f"socket={c['unix_socket']}")
    if target.password is not None:
        lines.append(f"password={option_value(target.password.reveal())}")
    with scratch.private_dir("mysql") as directory:  # swept if the worker is SIGKILLed
        path = os.path.join(directory, "client.cnf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        yield path


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def unquote_name(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] == "`":
        return name[1:-1].replace("``", "`")
    return name


def find_tool(*names: str) -> str:
    for name in names:
        if shutil.which(name):
            return name
    raise EngineError(f"none of {', '.join(names)} is installed (install mariadb-client or "
                      "mysql-client)", code="tool_missing")


async def tool_version(tool: str) -> str:
    proc = await asyncio.create_subprocess_exec(tool, "--version",
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


async def client_guard_flags(tool: str) -> list[str]:
    """Flags that keep a restored file from reaching the worker host: --binary-mode (client
    commands off except DELIMITER and \\C), --local-infile=0 (no LOAD DATA LOCAL), and
    MariaDB's --sandbox (no system/source/tee/pager) where the client has it."""
    flags = ["--binary-mode", "--local-infile=0"]
    proc = await asyncio.create_subprocess_exec(tool, "--help", "--verbose",
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    if b"--sandbox" in out:
        flags.append("--sandbox")
    return flags


@asynccontextmanager
async def connect(target: TargetConfig) -> AsyncIterator[aiomysql.Connection]:
    c = conn_params(target)
    try:
        conn = await aiomysql.connect(
            host=c["host"], port=c["port"], user=c["user"], db=c["database"] or None,
            password=target.password.reveal() if target.password else "",
            unix_socket=c["unix_socket"], charset="utf8mb4", connect_timeout=10)
    except (TimeoutError, OSError, pymysql.err.MySQLError) as exc:
        raise unreachable(target, "MySQL", exc,
                          f"{c['host']}:{c['port']}/{c['database']}") from None
    try:
        yield conn
    finally:
        conn.close()


async def query(conn: aiomysql.Connection, sql: str, *args: Any
                 ) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, args or None)
        return list(await cur.fetchall())


def text_of(value: object) -> str:
    """A value of a result row as text (the server sends some as bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) \
        else str(value if value is not None else "")


async def current_account(conn: aiomysql.Connection) -> str:
    """The account the connection logged in as, quoted as a GRANT names it: `app`@`%`."""
    (current,), = await query(conn, "SELECT CURRENT_USER()")
    user, _, host = text_of(current).rpartition("@")
    return f"{quote(user)}@{quote(host)}"
