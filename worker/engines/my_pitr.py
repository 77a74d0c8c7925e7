"""What MySQL/MariaDB point-in-time recovery needs from the server (issue 26): the checks
before streaming (binary log on, ROW format, a server id, the replication privileges —
each missing one named with the statement or setting that fixes it), where the server's
binary log stands, which files it still keeps, and the stock client that streams them
(`mariadb-binlog --read-from-remote-server --raw --stop-never`; the password from a 0600
option file, never argv)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomysql

from shared.config import TargetConfig
from shared.errors import EngineError
from shared.formats.binlog import file_parts, position
from worker.engines.my_connection import (
    conn_params,
    connect,
    current_account,
    defaults_file,
    find_tool,
    query,
    text_of,
)
from worker.subproc import Child, spawn

_GRANT_WORDS = re.compile(r"^GRANT (.+?) ON \*\.\* TO ", re.S)


@dataclass(frozen=True)
class ServerFacts:
    server_id: int
    version: str
    basename: str  # the binlog files' name before `.000042`
    mariadb: bool

    @property
    def identity(self) -> str:
        """What a binlog position is relative to: the server id and the files' name (a
        server replaced at the same address shows another, or restarts its numbering:
        see the archive's checks of each file's creation stamp)."""
        return f"{self.server_id}:{self.basename}"


async def preflight(target: TargetConfig) -> ServerFacts:
    """The server as PITR needs it, or an EngineError naming every missing piece."""
    user = conn_params(target)["user"]
    async with connect(target) as conn:
        (log_bin, fmt, server_id, version), = await query(
            conn, "SELECT @@log_bin, @@binlog_format, @@server_id, @@version")
        account = await current_account(conn)
        grants = [text_of(r[0]) for r in await query(conn, "SHOW GRANTS FOR CURRENT_USER()")]
    mariadb = "mariadb" in text_of(version).lower()
    missing: list[str] = []
    if not int(log_bin):
        missing.append("the binary log is off: start the server with log_bin (my.cnf "
                       "[mysqld] log_bin = binlog, then restart it)")
    if text_of(fmt).upper() != "ROW":
        missing.append(f"binlog_format is {text_of(fmt)}, not ROW: SET GLOBAL binlog_format = "
                       "'ROW' and binlog_format = ROW in my.cnf [mysqld]")
    if not int(server_id):
        missing.append("server_id is 0: SET GLOBAL server_id = 1 (and server_id in my.cnf)")
    have = set()
    for line in grants:
        if m := _GRANT_WORDS.match(line):
            have |= {w.strip().upper() for w in m.group(1).split(",")}
    if "ALL PRIVILEGES" not in have:
        need = ["REPLICATION SLAVE"] + (["BINLOG MONITOR"] if mariadb else
                                        ["REPLICATION CLIENT"])
        alias = {"BINLOG MONITOR": "REPLICATION CLIENT", "REPLICATION CLIENT": "BINLOG MONITOR",
                 "REPLICATION SLAVE": "REPLICATION REPLICA"}
        lacking = [p for p in need if p not in have and alias.get(p) not in have]
        if lacking:
            missing.append(f"the user {user} lacks {', '.join(lacking)}: GRANT "
                           f"{', '.join(lacking)} ON *.* TO {account}")
    if missing:
        raise EngineError(f"point-in-time recovery of target '{target.id}' needs: "
                          + "; ".join(missing), code="pitr_not_ready")
    async with connect(target) as conn:
        status = await query(conn, "SHOW MASTER STATUS")
    parts = file_parts(text_of(status[0][0])) if status else None
    if parts is None:
        raise EngineError(f"SHOW MASTER STATUS on target '{target.id}' names no binlog file "
                          "of the form name.000001", code="pitr_not_ready")
    return ServerFacts(int(server_id), text_of(version), parts[0], mariadb)


async def server_position(conn: aiomysql.Connection) -> int | None:
    """Where the server's binary log ends now (SHOW MASTER STATUS), as one position."""
    rows = await query(conn, "SHOW MASTER STATUS")
    parts = file_parts(text_of(rows[0][0])) if rows else None
    return position(parts[1], int(rows[0][1])) if parts else None


async def server_files(conn: aiomysql.Connection, basename: str) -> dict[int, int]:
    """The binlog files the server keeps: number -> size."""
    out = {}
    for row in await query(conn, "SHOW BINARY LOGS"):
        parts = file_parts(text_of(row[0]))
        if parts and parts[0] == basename:
            out[parts[1]] = int(row[1])
    return out


def file_name(basename: str, number: int) -> str:
    return f"{basename}.{number:06d}"


@contextlib.asynccontextmanager
async def receiving(target: TargetConfig, spool: Path, basename: str, number: int,
                    offset: int) -> AsyncIterator[Child]:
    """`mariadb-binlog --raw --stop-never` from file `number` at `offset` (4 or less:
    the file's start) into `spool` (one file per server file, named as the server's)."""
    tool = find_tool("mariadb-binlog", "mysqlbinlog")
    with defaults_file(target, charset=False) as cnf:
        argv = [tool, f"--defaults-file={cnf}", "--read-from-remote-server", "--raw",
                "--stop-never", f"--result-file={spool}/", "--stop-never-slave-server-id="
                f"{_connection_id(target)}"]
        if offset > 4:
            argv.append(f"--start-position={offset}")
        argv += ["--", file_name(basename, number)]
        async with spawn(argv, env={}, secrets=target.secrets()) as child:
            yield child


def _connection_id(target: TargetConfig) -> int:
    """A replica server id for the stream, stable per target (never the server's own:
    two connections with one id kick each other off)."""
    import zlib

    return 1_000_000_000 + zlib.crc32(target.id.encode()) % 1_000_000_000


def tool_missing() -> EngineError | None:
    try:
        find_tool("mariadb-binlog", "mysqlbinlog")
    except EngineError as exc:
        return exc
    return None
