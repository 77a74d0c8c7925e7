"""The sessions that hold up a MySQL/MariaDB restore: found while the load waits for a
metadata lock, shown in the job's progress, ended (KILL) with terminate_connections."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import pymysql

from shared.config import TargetConfig
from shared.errors import EngineError, RestoreFailed
from worker.engines import Blocker, blockers_watched
from worker.engines.my_connection import conn_params, connect, query
from worker.progress import Progress

MY_COLUMNS = ("p.ID, p.USER, p.HOST, p.COMMAND, p.TIME, t.trx_started")


MY_BLOCKERS = (f"SELECT {MY_COLUMNS} FROM information_schema.INNODB_TRX t "
                "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id "
                "WHERE p.DB = %s AND p.ID <> %s AND p.ID <> CONNECTION_ID()")


MY_SESSIONS = (f"SELECT {MY_COLUMNS} FROM information_schema.PROCESSLIST p "
                "LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID "
                "WHERE p.DB = %s AND p.ID <> CONNECTION_ID()")


MY_USER_SESSIONS = ("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s "
                     "AND DB = %s AND ID <> CONNECTION_ID()")


MY_SESSIONS_NO_TRX = ("SELECT p.ID, p.USER, p.HOST, p.COMMAND, p.TIME, NULL "
                       "FROM information_schema.PROCESSLIST p "
                       "WHERE p.DB = %s AND p.ID <> CONNECTION_ID()")


ACCESS_DENIED_PROCESS = 1227  # INNODB_TRX needs the PROCESS privilege


def my_blocker(r: tuple[object, ...]) -> Blocker:
    pid, user, host, command, secs, trx_started = r
    state = "idle" if command == "Sleep" else str(command).lower()
    if trx_started is not None:
        state += " in transaction"
    return {"id": int(str(pid)), "user": _text(user), "application": None,
            "client": _text(host), "state": state,
            "since": trx_started.isoformat(timespec="seconds")
            if isinstance(trx_started, datetime) else None}


def _text(value: object) -> str | None:
    return None if value is None else str(value)


@asynccontextmanager
async def watch_blockers(target: TargetConfig, progress: Progress, seen: list[Blocker],
                    terminate: bool) -> AsyncIterator[None]:
    """While the load runs: when it waits for a metadata lock, the sessions on this
    database with an open transaction (what holds such locks; MariaDB has no
    per-lock view without performance_schema), shown in the job's progress; with
    `terminate`, the database's other sessions are ended (KILL) at the start and any
    such session while the load waits."""
    db = conn_params(target)["database"]
    user = conn_params(target)["user"]
    async with contextlib.AsyncExitStack() as stack:
        try:
            conn = await stack.enter_async_context(connect(target))
            await conn.autocommit(True)
        except (EngineError, pymysql.err.MySQLError) as exc:
            message = exc.message if isinstance(exc, EngineError) else str(exc)
            raise RestoreFailed(message, database_unchanged=True) from None

        # the restore's own session: the first of this user's sessions on the database
        # that did not exist before the client started
        before = {r[0] for r in await query(conn, MY_USER_SESSIONS, user, db)}
        ours: list[int] = []

        async def find() -> list[Blocker]:
            if not ours:
                new = sorted(r[0] for r in await query(conn, MY_USER_SESSIONS,
                                                             user, db)
                             if r[0] not in before)
                if not new:
                    return []
                ours.append(new[0])
            waiting = await query(
                conn, "SELECT ID FROM information_schema.PROCESSLIST WHERE ID = %s "
                "AND STATE LIKE 'Waiting for %%lock%%'", ours[0])
            if not waiting:
                return []
            try:
                rows = await query(conn, MY_BLOCKERS, db, waiting[0][0])
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != ACCESS_DENIED_PROCESS:
                    raise
                # without PROCESS, transactions cannot be seen: every other session
                # on the database (of this user: all it may see) is a suspect
                rows = [r for r in await query(conn, MY_SESSIONS_NO_TRX, db)
                        if r[0] != waiting[0][0]]
            return [my_blocker(r) for r in rows]

        async def end(blockers: list[Blocker]) -> None:
            for b in blockers:
                try:
                    await query(conn, f"KILL CONNECTION {int(b['id'])}")
                except pymysql.err.MySQLError as exc:
                    progress.warn(f"could not end session {b['id']}: {exc.args[-1]} "
                                  f"(the user {user} needs CONNECTION ADMIN or SUPER)")
                else:
                    progress.log(f"ended session {b['id']}")

        async def others() -> list[Blocker]:
            try:
                listed = await query(conn, MY_SESSIONS, db)
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != ACCESS_DENIED_PROCESS:
                    raise
                listed = await query(conn, MY_SESSIONS_NO_TRX, db)
            return [my_blocker(r) for r in listed]

        async with blockers_watched(progress, seen, find, end,
                                    others if terminate else None):
            yield
