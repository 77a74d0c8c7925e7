"""Driving psql through a restore: the begin/ready markers that prove Safehold's transaction
held, the watchdog for a psql left waiting for input, the backup's own line numbers in
errors, the `\\restrict` requirement, and the sessions that block the load (shown, or
ended with terminate_connections)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from shared.config import TargetConfig
from shared.errors import (
    EngineError,
    RestoreFailed,
    ToolTooOld,
)
from worker.engines import Blocker, blockers_watched
from worker.engines.pg_connection import conn_params, connect, tool_major
from worker.progress import Progress
from worker.subproc import Child

SESSION_COLUMNS = ("b.pid, b.usename, b.application_name, host(b.client_addr) AS client, "
                    "b.state, coalesce(b.xact_start, b.state_change) AS since")
BLOCKERS = (f"SELECT DISTINCT {SESSION_COLUMNS} FROM pg_stat_activity w "
             "CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS x(pid) "
             "JOIN pg_stat_activity b ON b.pid = x.pid WHERE w.application_name = $1")
SESSIONS = (f"SELECT {SESSION_COLUMNS} FROM pg_stat_activity b "
             "WHERE b.datname = current_database() AND b.pid <> pg_backend_pid() "
             "AND b.backend_type = 'client backend' AND b.application_name <> $1")


def blocker(r: asyncpg.Record) -> Blocker:
    since = r["since"]
    return {"id": r["pid"], "user": r["usename"], "application": r["application_name"] or None,
            "client": r["client"], "state": r["state"],
            "since": since.isoformat(timespec="seconds") if since else None}


async def end_sessions(conn: asyncpg.Connection, pids: list[int], progress: Progress,
                     target: TargetConfig) -> None:
    ended = []
    for pid in pids:  # one at a time: a superuser's session refused does not stop the rest
        try:
            if await conn.fetchval("SELECT pg_terminate_backend($1)", pid):
                ended.append(pid)
        except asyncpg.InsufficientPrivilegeError as exc:
            progress.warn(f"could not end session {pid} ({exc}): the role "
                          f"{conn_params(target)['user']} needs pg_signal_backend (or to be that "
                          "session's role)")
    if ended:
        progress.log(f"ended {len(ended)} session(s): {', '.join(map(str, ended))}")


STUCK_CHECKS = 3  # looks, a second apart, at a psql blocked reading its empty input


async def read_markers(child: Child, key: str) -> tuple[bytes | None, bytes] | None:
    """Drain psql's stdout (unaligned, tuples only); return (txid after BEGIN, txid at the
    end) once the end marker is printed, None if the output ends without it. Only the
    start of each line is kept, so a huge result row costs nothing."""
    begin, ready = f"safehold-begin-{key}|".encode(), f"safehold-ready-{key}|".encode()
    first: bytes | None = None
    line = b""
    while data := await child.read():
        for piece in data.split(b"\n")[:-1] if b"\n" in data else []:
            line = (line + piece)[:200]
            if line.startswith(begin):
                first = line[len(begin):].strip()
            elif line.startswith(ready):
                return first, line[len(ready):].strip()
            line = b""
        tail = data.rsplit(b"\n", 1)[-1]
        line = (line + tail)[:200]
    return None


async def await_markers(child: Child, markers: asyncio.Future[
        tuple[bytes | None, bytes] | None]) -> tuple[bytes | None, bytes] | None:
    """Wait for psql's end marker. A watchdog makes sure psql is still working: if psql
    sits blocked reading its (empty) input after the whole file was sent, it is waiting
    for more — the script does not end where the guard saw it end — and the restore is
    refused rather than left hanging until the job times out."""
    stuck = 0
    while True:
        done, _ = await asyncio.wait({markers}, timeout=1.0)
        if done:
            return markers.result()
        stuck = stuck + 1 if blocked_reading_stdin(child.proc.pid) else 0
        if stuck >= STUCK_CHECKS:
            raise RestoreFailed(
                "psql is still waiting for input after the end of the backup: the script "
                "does not end where it seems to; nothing was committed",
                database_unchanged=True, code="unsafe_backup")


def blocked_reading_stdin(pid: int) -> bool:
    """Linux: the process sits in read(0, …) (x86-64 and arm64 syscall numbers)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) >= 2 and fields[0] in ("0", "63") and fields[1] == "0x0"


PRELUDE_LINES = 2  # "\\restrict KEY" and "BEGIN; <clean>" come before the backup's line 1
_PSQL_LINE = re.compile(r"psql:<stdin>:(\d+):")


def backup_lines(text: str, offset: int) -> str:
    """psql counts our prelude lines: report the backup file's own line numbers."""
    return _PSQL_LINE.sub(lambda m: f"line {max(int(m.group(1)) - offset, 0)}:", text)


_RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}


async def require_restrict_psql() -> None:
    """psql must know `\\restrict` (13.22, 14.19, 15.14, 16.10, 17.6 and every 18)."""
    _major, text = await tool_major("psql")
    m = re.search(r"(\d+)\.(\d+)", text)
    major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if major in _RESTRICT_SINCE and minor >= _RESTRICT_SINCE[major] or major >= 18:
        return
    raise ToolTooOld(f"{text} cannot run a restore safely: it lacks \\restrict, so a backup "
                     "file could run shell commands through psql meta-commands. Install psql "
                     "13.22 / 14.19 / 15.14 / 16.10 / 17.6 or newer")


@asynccontextmanager
async def watch_blockers(target: TargetConfig, tag: str, progress: Progress,
                         seen: list[Blocker], terminate: bool) -> AsyncIterator[None]:
    """While the load runs: the sessions that block psql (`tag`), from
    `pg_blocking_pids`, shown in the job's progress; with `terminate`, the database's
    other sessions are ended at the start and any blocker as it appears. (New
    sessions are not refused with ALLOW_CONNECTIONS: a worker killed meanwhile would
    leave the database closed. They cannot hold the restore up: their lock requests
    queue behind the restore's, and one that blocks it is ended too.)"""
    async with contextlib.AsyncExitStack() as stack:
        try:
            conn = await stack.enter_async_context(connect(target))
        except EngineError as exc:  # before psql started: nothing touched
            raise RestoreFailed(exc.message, database_unchanged=True,
                                code=exc.code) from None

        async def find() -> list[Blocker]:
            return [blocker(r) for r in await conn.fetch(BLOCKERS, tag)]

        async def end(blockers: list[Blocker]) -> None:
            await end_sessions(conn, [int(b["id"]) for b in blockers], progress, target)

        async def others() -> list[Blocker]:
            return [blocker(r) for r in await conn.fetch(SESSIONS, tag)]

        async with blockers_watched(progress, seen, find, end,
                                    others if terminate else None):
            yield
