"""MySQL / MariaDB: `mariadb-dump`/`mysqldump` out, the `mariadb`/`mysql` client in.

Credentials and the connection go to the tools in a 0600 option file
(`--defaults-file`, the first argument), never argv. The dump is
`--single-transaction` (a consistent InnoDB snapshot, no table locks) with routines,
triggers, events and `--hex-blob`, in utf8mb4. A clean restore drops the database's tables,
views, sequences, routines and events (foreign key checks off) in the client session that
then loads the dump. MySQL DDL commits implicitly, so a failed restore leaves the database
in an unknown state: the job runner then restores the safety backup automatically.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import aiomysql
import pymysql

from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import DumpFailed, EngineError, RestoreFailed
from shared.formats.binlog import DumpPosition as BinlogPosition
from shared.formats.binlog import file_parts
from shared.formats.mytables import MyTableCut, RefusedStatement
from shared.formats.pgscript import UnsafeScript
from shared.jobs import Phase
from worker.engines import (
    NO_OPTIONS,
    Blocker,
    Dump,
    DumpOptions,
    RestoreOptions,
    describe,
    my_blockers,
    restore_errors,
    server_sets,
)
from worker.engines import mysql_accounts as accts
from worker.engines.globals_head import AWK, GlobalsHead, commented
from worker.engines.my_connection import (
    client_guard_flags,
    conn_params,
    connect,
    defaults_file,
    find_tool,
    query,
    quote,
    text_of,
    tool_version,
)
from worker.engines.my_drill import InsertRows, MySQLDrill
from worker.progress import Progress
from worker.subproc import feed_stdin, spawn

_TABLE_DONE = re.compile(r"^-- Retrieving rows")


_VERBOSE = re.compile(r"^-- ")


def _invalid_views_trailer(invalid: dict[str, tuple[str, str]]) -> bytes:
    lines = ["", "-- Safehold: views that were invalid when this backup was made (the server",
             "-- could not resolve them), kept as their definitions; they are not restored:"]
    for name, (why, create) in sorted(invalid.items()):
        lines.append(f"-- view {quote(name)}: {why}")
        lines += [f"--   {line}" for line in create.splitlines()]
    lines.append(f"-- Dump completed (Safehold: {len(invalid)} invalid view(s) kept above)")
    return ("\n".join(lines) + "\n").encode()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _kept_grant(line: str, db: str, wanted: set[str]) -> str | None:
    """A `SHOW GRANTS` line about `db` (or a role grant or default role among `wanted`),
    as Safehold writes it in the head; None for the rest (server-wide, other databases)."""
    try:
        found = accts.parse_one(line, db)
    except accts.BadAccounts:
        return None
    if isinstance(found, accts.Grant):
        return found.sql(db)
    if isinstance(found, (accts.RoleGrant, accts.DefaultRole)) and \
            found.role in wanted and found.to in wanted:
        return found.sql()
    return None


def _estimate(rows: Any) -> int | None:
    """information_schema's row estimate; null when the server has none (never 0 for
    unknown)."""
    return None if rows is None else int(rows)


class MySQL:
    name: ClassVar[str] = "mysql"
    extension: ClassVar[str] = ENGINES["mysql"].extension
    atomic_restore: ClassVar[bool] = False

    def connect(self, target: TargetConfig) -> contextlib.AbstractAsyncContextManager[
            aiomysql.Connection]:
        return connect(target)

    async def query(self, conn: aiomysql.Connection, sql: str, *args: Any
                    ) -> list[tuple[Any, ...]]:
        return await query(conn, sql, *args)

    @property
    def drill(self) -> MySQLDrill:
        return MySQLDrill()

    def row_counter(self) -> InsertRows:
        return InsertRows()

    async def _catalog(self, conn: aiomysql.Connection, db: str) -> dict[str, Any]:
        version = (await self.query(conn, "SELECT VERSION()"))[0][0]
        tables = await self.query(
            conn, "SELECT TABLE_NAME, TABLE_TYPE, TABLE_ROWS, "
            "COALESCE(DATA_LENGTH, 0) + COALESCE(INDEX_LENGTH, 0), COALESCE(DATA_LENGTH, 0), "
            "ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s ORDER BY 1", db)
        routines = await self.query(
            conn, "SELECT ROUTINE_NAME, ROUTINE_TYPE FROM information_schema.ROUTINES "
            "WHERE ROUTINE_SCHEMA = %s", db)
        events = await self.query(
            conn, "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = %s", db)
        return {"version": version, "tables": tables, "routines": routines,
                "events": [e[0] for e in events]}

    async def ping(self, target: TargetConfig) -> None:
        async with self.connect(target) as conn:
            await self.query(conn, "SELECT 1")

    async def stats(self, target: TargetConfig) -> dict[str, object]:
        if target.is_set:
            return await server_sets.stats_set(self, target)
        db = conn_params(target)["database"]
        async with self.connect(target) as conn:
            cat = await self._catalog(conn, db)
        base = [t for t in cat["tables"] if t[1] == "BASE TABLE"]
        return {
            "engine": self.name,
            "server_version": cat["version"],
            "database": db,
            "size_bytes": sum(int(t[3]) for t in base),
            "table_count": len(base),
            "views": [t[0] for t in cat["tables"] if t[1] == "VIEW"],
            "routines": len(cat["routines"]),
            "events": len(cat["events"]),
            "tables": [{"name": t[0], "rows_estimate": _estimate(t[2]), "size_bytes": int(t[3]),
                        "storage_engine": t[5]} for t in base],
        }

    @asynccontextmanager
    async def dump(self, target: TargetConfig, progress: Progress,
                   options: DumpOptions | None = None) -> AsyncIterator[Dump]:
        if target.is_set:  # a server target: every database, one set (server_sets)
            async with server_sets.dump_set(self, target, progress, options) as dumped:
                yield dumped
            return
        db = conn_params(target)["database"]
        async with self.connect(target) as conn:
            cat = await self._catalog(conn, db)
            schema = await self.query(
                conn, "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM "
                "information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", db)
        tool = find_tool("mariadb-dump", "mysqldump")
        version = await tool_version(tool)
        flags = ["--single-transaction", "--routines", "--triggers", "--events",
                   "--hex-blob", "--default-character-set=utf8mb4", "--no-tablespaces",
                   "--verbose"]
        if "mariadb" not in version.lower():  # MySQL's mysqldump
            flags.append("--set-gtid-purged=OFF")
            if "mariadb" in str(cat["version"]).lower():
                flags.append("--column-statistics=0")
        base = [t for t in cat["tables"] if t[1] == "BASE TABLE"]
        only = list((options or {}).get("tables") or [])  # a safety backup of some tables
        # a PITR target's backups are its bases: each records the binlog position of its
        # snapshot (MariaDB: from the consistent snapshot itself, no global lock)
        position = BinlogPosition() if target.pitr is not None and target.pitr.enabled \
            and not only else None
        if position is not None:
            flags.append("--master-data=2" if "mariadb" in version.lower()
                         else "--source-data=2")
        if only:
            base = [t for t in base if t[0] in only]
        progress.item_kind = "tables"
        progress.set_phase(Phase.DUMPING, bytes_total=sum(int(t[4]) for t in base) or None,
                           items_total=len(base))

        def on_line(line: str) -> None:
            if _TABLE_DONE.match(line) and progress.items_done < (progress.items_total or 0):
                progress.items_done += 1

        async with self.connect(target) as conn:
            invalid = await self._invalid_views(conn, db, cat)
            head, facts = (await self._accounts_head(conn, db, str(cat["version"]))
                           if target.globals and not only else (b"", None))
        skip = [f"--ignore-table={db}.{name}" for name in invalid]
        for name, (why, _) in invalid.items():
            progress.warn(f"view `{name}` is invalid ({why}); it is kept in the backup as its "
                          "definition in a comment and will not exist after a restore")
        with defaults_file(target) as cnf:
            # `--`: a database named like an option (`--result-file=…`) stays a name
            argv = [tool, f"--defaults-file={cnf}", *flags, *skip, "--", db, *only]
            async with spawn(argv, env={}, secrets=target.secrets(), stdout=True,
                             on_line=on_line) as child:
                async def chunks() -> AsyncIterator[bytes]:
                    if head:
                        yield head
                    while data := await child.read():
                        if position is not None and not position.done:
                            position.feed(data)
                        yield data
                    if invalid and await child.wait() == 0:
                        yield _invalid_views_trailer(invalid)
                    if position is not None:
                        info["binlog"] = await self._binlog_facts(target, position)

                info: dict[str, object] = {
                    "server_version": cat["version"], "tool": tool, "tool_version": version,
                    "options": flags, "database": db,
                    "invalid_views": sorted(invalid) or None,
                    "counts": {t[0]: _estimate(t[2]) for t in base},
                    "count_kind": "rows_estimate",
                    "database_options": ({"character_set": schema[0][0],
                                          "collation": schema[0][1]} if schema else None),
                    **({"globals": facts} if facts is not None else {}),
                    **({"only_tables": only} if only else {}),
                }
                yield Dump(chunks(), info)
                rc = await child.wait()
                if rc != 0:
                    detail = child.error_text(skip=lambda ln: bool(_VERBOSE.match(ln)))
                    raise DumpFailed(f"{tool} exited with code {rc}: {detail}")

    async def _binlog_facts(self, target: TargetConfig, position: BinlogPosition
                            ) -> dict[str, object]:
        """Where in the binlog the dump's snapshot stands, for the PITR window: the file
        and offset the dump wrote in its header, the server's id and the GTID position
        there (MariaDB)."""
        if position.found is None:
            raise DumpFailed("the dump of a PITR target wrote no binlog position (CHANGE "
                             "MASTER TO … in its header): it cannot be a base")
        name, offset, at = position.found
        parts = file_parts(name)
        if parts is None:
            raise DumpFailed(f"the dump's binlog file {name[:60]!r} is not name.000001")
        async with self.connect(target) as conn:
            (server_id,), = await self.query(conn, "SELECT @@server_id")
            gtid = None
            with contextlib.suppress(Exception):  # MariaDB only
                gtid = text_of((await self.query(conn, "SELECT BINLOG_GTID_POS(%s, %s)",
                                               name, offset))[0][0])
        return {"file": name, "number": parts[1], "position": offset, "gtid": gtid or None,
                "identity": f"{int(server_id)}:{parts[0]}",
                "consistent_at": at.isoformat(timespec="milliseconds").replace(
                    "+00:00", "Z")}

    async def server_databases(self, target: TargetConfig) -> list[str]:
        async with self.connect(target) as conn:
            rows = await self.query(conn, "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA "
                                     "ORDER BY 1")
        system = {"information_schema", "performance_schema", "mysql", "sys"}
        return [text_of(r[0]) for r in rows if text_of(r[0]) not in system]

    async def create_database(self, target: TargetConfig, name: str, facts: Mapping[str, object],
                              progress: Progress) -> bool:
        """A set's database on a server that lacks it: created with its character set and
        collation. True when it was created."""
        opts = facts.get("database_options")
        opts = opts if isinstance(opts, dict) else {}
        spec = " ".join(f"{k} {v}" for k, v in (
            ("CHARACTER SET", opts.get("character_set")), ("COLLATE", opts.get("collation")))
            if isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_]{1,64}", v))
        async with self.connect(target) as conn:
            if await self.query(conn, "SELECT 1 FROM information_schema.SCHEMATA WHERE "
                                 "SCHEMA_NAME = %s", name):
                return False
            try:
                await self.query(conn, f"CREATE DATABASE {quote(name)} {spec}")
            except pymysql.err.MySQLError as exc:
                raise RestoreFailed(f"cannot create database {name}: {exc}",
                                    database_unchanged=True) from None
        progress.log(f"created database {name}")
        return True

    async def drop_database(self, target: TargetConfig, name: str) -> None:
        async with self.connect(target) as conn:
            await self.query(conn, f"DROP DATABASE IF EXISTS {quote(name)}")

    async def quiet_copy(self, target: TargetConfig, name: str) -> list[str]:
        """A copy beside the live database: its scheduled events are disabled (they would
        run against the copy — or, naming the live database, against that)."""
        async with self.connect(target) as conn:
            events = await self.query(conn, "SELECT EVENT_NAME FROM information_schema.EVENTS "
                                      "WHERE EVENT_SCHEMA = %s AND STATUS = 'ENABLED'", name)
            for (event,) in events:
                await self.query(conn, f"ALTER EVENT {quote(name)}.{quote(event)} DISABLE")
        return [f"{len(events)} scheduled event(s) of the copy {name} were disabled (ALTER "
                "EVENT … ENABLE to run them there)"] if events else []

    async def database_restored(self, target: TargetConfig, name: str,
                                facts: Mapping[str, object]) -> None:
        return None  # a MySQL database has no owner

    async def precheck(self, target: TargetConfig, facts: Mapping[str, object],
                       options: RestoreOptions) -> None:
        """Accounts the member's manifest names that the server lacks, with no choice made:
        refused before anything changes (its head is checked again when it loads)."""
        named = globals_.get("accounts") if isinstance(
            globals_ := facts.get("globals"), dict) else None
        if not isinstance(named, list) or options.roles in ("create", "skip"):
            return
        existing, _ = await self._existing_accounts(target)
        missing = sorted(str(n) for n in named if isinstance(n, str) and n not in existing)
        if missing:
            raise RestoreFailed(
                f"the backup's grants name accounts this server does not have: "
                f"{', '.join(missing[:50])}. Nothing was changed. Choose: \"roles\": "
                "\"create\" or \"roles\": \"skip\"", database_unchanged=True,
                code="roles_missing")

    async def _existing_accounts(self, target: TargetConfig) -> tuple[set[str], bool]:
        """The server's accounts (as `user`@`host`, roles as `role`) and whether it is
        MariaDB; refused before anything changes when the restoring user cannot read them."""
        try:
            async with self.connect(target) as conn:
                version = str((await self.query(conn, "SELECT VERSION()"))[0][0])
                mariadb = "mariadb" in version.lower()
                rows = await self.query(conn, "SELECT User, Host, "
                                         + ("is_role" if mariadb else "'N'")
                                         + " FROM mysql.user")
        except pymysql.err.MySQLError as exc:
            raise RestoreFailed(
                f"the backup carries accounts and grants, and the restoring user cannot "
                f"read the server's ({exc.args[-1] if exc.args else exc}); nothing was "
                "changed. Restore as a user that can (SELECT ON mysql.*, CREATE USER), or "
                "with \"roles\": \"skip\"", database_unchanged=True,
                code="roles_missing") from None
        return {accts.account(text_of(u), None if text_of(r) == "Y" else text_of(h))
                for u, h, r in rows}, mariadb

    async def _accounts_head(self, conn: aiomysql.Connection, db: str, version: str
                             ) -> tuple[bytes, dict[str, Any]]:
        """The accounts that reach `db` — holders of a privilege on it, and every account
        granted one of those roles — as the head of the dump (see mysql_accounts), and
        what the manifest says of them."""
        try:
            exact = accts.escape_db(db)  # a database-level grant on exactly this one
            holders = await self.query(conn, " UNION ".join(
                f"SELECT User, Host FROM mysql.{t} WHERE Db = %s" + (" OR Db = %s" if t == "db"
                                                                   else "")
                for t in ("db", "tables_priv", "columns_priv", "procs_priv")),
                db, exact, db, db, db)
            users = await self.query(conn, "SELECT User, Host, plugin, authentication_string, "
                                      + ("is_role" if "mariadb" in version.lower()
                                         else "'N'") + " FROM mysql.user")
        except pymysql.err.MySQLError as exc:
            raise DumpFailed(f"the backup carries the accounts that reach the database "
                             f"(globals = true, or a server target) and cannot read them "
                             f"({exc.args[-1] if exc.args else exc}): GRANT SELECT ON mysql.* "
                             "TO the backup's user (or, for one database, globals = false)"
                             ) from None
        try:  # role grants: MariaDB's roles_mapping, MySQL 8's role_edges
            edges = [(role, "", user, host, admin == "Y") for host, user, role, admin in
                     await self.query(conn, "SELECT Host, User, Role, Admin_option "
                                       "FROM mysql.roles_mapping")]
        except pymysql.err.MySQLError:
            try:
                edges = [tuple(r[:4]) + (r[4] == "Y",) for r in await self.query(
                    conn, "SELECT FROM_USER, FROM_HOST, TO_USER, TO_HOST, WITH_ADMIN_OPTION "
                    "FROM mysql.role_edges")]
            except pymysql.err.MySQLError:
                edges = []
        info = {(text_of(u), text_of(h)): (text_of(p), text_of(a), text_of(r) == "Y")
                for u, h, p, a, r in users}

        def name(user: str, host: str) -> str:
            is_role = info.get((user, host), ("", "", False))[2]
            return accts.account(user, None if is_role else host)
        reach = {(text_of(u), text_of(h)) for u, h in holders}
        grown = True
        while grown:  # members of a role that reaches the database, transitively
            # (a role's creator holds it WITH ADMIN OPTION: administration, not use)
            more = {(text_of(tu), text_of(th)) for ru, rh, tu, th, admin in edges
                    if (text_of(ru), text_of(rh)) in reach and not admin}
            grown = not more <= reach
            reach |= more
        wanted = {name(u, h) for u, h in reach}
        creates, grants, left_out = [], [], []
        for user, host in sorted(reach):
            plugin, auth, is_role = info.get((user, host), ("", "", False))
            acc = accts.Account(user, None if is_role else host, plugin, auth)
            if plugin and plugin not in accts.PLUGINS or any(
                    c in auth for c in "\\\0\n") or not auth.isprintable():
                left_out.append(f"{acc.name}: login ({plugin or 'none'}) not kept")
                acc.plugin, acc.auth = "", ""
            creates.append(acc.create_sql(mysql="mariadb" not in version.lower()))
            for (line,) in await self.query(conn, f"SHOW GRANTS FOR {acc.name}"):
                kept = _kept_grant(text_of(line), db, wanted)
                if kept:
                    grants.append(kept)
                elif " ON *.* " in text_of(line) and not text_of(line).startswith("GRANT USAGE "):
                    left_out.append(f"{acc.name}: server-wide privileges")
        body = "\n".join(creates + grants) + "\n" if creates else ""
        header = ("--\n-- Safehold: the accounts that reach this database (users, roles, "
                  "their logins and\n-- grants on it), commented out as '-- G ' lines. On "
                  f"a new server, after the load:\n--   {AWK} THIS.sql > accounts.sql\n"
                  "--   mysql < accounts.sql\n--\n")
        chunks = [c async for c in commented(_one(body.encode()))]
        return (header.encode() + b"".join(chunks) if body else b""), {
            "accounts": sorted(wanted), "left_out": sorted(set(left_out))}

    async def _invalid_views(self, conn: aiomysql.Connection, db: str,
                             cat: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Views the server cannot resolve (a table dropped under them: often the very
        reason for a restore). mysqldump stops on them; Safehold skips them in the dump and
        keeps their definitions. name -> (error, CREATE VIEW statement)."""
        out: dict[str, tuple[str, str]] = {}
        for name, ttype, *_ in cat["tables"]:
            if ttype != "VIEW":
                continue
            try:
                await self.query(conn, f"SHOW FIELDS FROM {quote(db)}.{quote(name)}")
            except pymysql.err.MySQLError as exc:
                try:
                    create = (await self.query(
                        conn, f"SHOW CREATE VIEW {quote(db)}.{quote(name)}"))[0][1]
                except pymysql.err.MySQLError:
                    create = "(definition unavailable)"
                out[name] = (str(exc.args[-1]) if exc.args else str(exc), str(create))
        return out

    async def _clean_sql(self, target: TargetConfig) -> str:
        """Empties the database. Its first statements take a write lock on every table at
        once, waiting at most `target.lock_timeout` for the application's metadata locks:
        an error up to `CLEAN_LOCK_LINE` left the database unchanged."""
        db = conn_params(target)["database"]
        async with self.connect(target) as conn:
            cat = await self._catalog(conn, db)
        kinds = {"BASE TABLE": "TABLE", "VIEW": "VIEW", "SEQUENCE": "SEQUENCE",
                 "SYSTEM VERSIONED": "TABLE"}
        tables = [t[0] for t in cat["tables"] if t[1] in ("BASE TABLE", "SYSTEM VERSIONED")]
        sql = [f"SET SESSION lock_wait_timeout = {max(1, round(target.lock_timeout))};",
               "SET FOREIGN_KEY_CHECKS = 0;",
               ("LOCK TABLES " + ", ".join(f"{quote(t)} WRITE" for t in tables) + ";")
               if tables else "DO 0;"]
        sql += [f"DROP TABLE IF EXISTS {quote(t)};" for t in tables]
        # the bound is for the clean's wait on the application: the load goes on as before
        sql += ["UNLOCK TABLES;", "SET SESSION lock_wait_timeout = DEFAULT;"]
        for name, ttype, *_ in cat["tables"]:
            if name not in tables:
                sql.append(f"DROP {kinds.get(ttype, 'TABLE')} IF EXISTS {quote(name)};")
        for name, rtype in cat["routines"]:
            sql.append(f"DROP {rtype} IF EXISTS {quote(name)};")
        sql += [f"DROP EVENT IF EXISTS {quote(e)};" for e in cat["events"]]
        sql.append("SET FOREIGN_KEY_CHECKS = 1;")
        return "\n".join(sql) + "\n"

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        if target.is_set:  # every database of the set, or the one asked for
            await server_sets.restore_set(self, target, chunks, progress, clean=clean,
                                          manifest=manifest, options=options)
            return
        db = conn_params(target)["database"]
        if options.tables:
            await self._restore_tables(target, chunks, progress, options)
            return
        try:
            prelude = await self._clean_sql(target) if clean else ""
        except EngineError as exc:
            raise RestoreFailed(exc.message, database_unchanged=True, code=exc.code) from None
        tool = find_tool("mariadb", "mysql")
        seen: list[Blocker] = []
        accounts = accts.Plan()

        async def source() -> AsyncIterator[bytes]:
            """The clean, then the dump — once its head (the backup's accounts, if any)
            was read and the roles choice checked, before anything is sent — then the
            accounts and grants (after the data: a column grant needs its table)."""
            nonlocal accounts
            head = GlobalsHead()
            opened = False
            async for chunk in chunks:  # ends only after the stored sha256 was verified
                progress.add_bytes(len(chunk))
                if not opened:
                    head.feed(chunk)
                    if not head.done:
                        continue
                    chunk = bytes(head.held)
                    accounts = await self._accounts_plan(target, manifest, options, head)
                    yield prelude.encode()
                    opened = True
                yield chunk
            if not opened:
                head.finish()
                accounts = await self._accounts_plan(target, manifest, options, head)
                yield prelude.encode() + bytes(head.held)
            if accounts.sql:
                yield f"\n{accounts.sql}\n".encode()

        with defaults_file(target) as cnf:
            argv = [tool, f"--defaults-file={cnf}", *await client_guard_flags(tool), "--", db]
            async with my_blockers.watch_blockers(target, progress, seen, options.terminate), \
                    spawn(argv, env={}, secrets=target.secrets(), stdin=True) as child:
                with restore_errors(target, "MySQL"):
                    try:
                        await feed_stdin(child, b"", source(), lambda n: None)
                    except UnsafeScript as exc:
                        raise RestoreFailed(f"the backup was refused: {exc.message}",
                                            database_unchanged=True, code=exc.code) from None
                rc = await child.wait()
        if rc == 0:
            if accounts.created:
                progress.warn(f"roles = \"create\": created {', '.join(accounts.created)} "
                              "as the backup describes them")
            for warning in accounts.warnings:
                progress.warn(warning)
            return
        text = child.error_text()
        at = _ERROR_LINE.search(text)
        unchanged = bool(clean and at and int(at.group(2)) <= CLEAN_LOCK_LINE)
        if unchanged and at and at.group(1) == "1205":
            raise RestoreFailed(
                f"the restore waited {target.lock_timeout:g} s for the metadata locks of "
                f"{describe(seen) or 'other sessions'} and gave up before changing "
                "anything. End those sessions (or restore with \"terminate_connections\": "
                f"true, or raise [targets.{target.id}] lock_timeout) and restore again",
                database_unchanged=True, code="lock_timeout")
        raise RestoreFailed(f"{tool} exited with code {rc}: {text}",
                            database_unchanged=unchanged)

    async def tables_present(self, target: TargetConfig, tables: Sequence[str]) -> list[str]:
        async with self.connect(target) as conn:
            have = {text_of(r[0]) for r in await self.query(
                conn, "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
                "%s AND TABLE_TYPE = 'BASE TABLE'", conn_params(target)["database"])}
        return [t for t in tables if t in have]

    async def _restore_tables(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                              progress: Progress, options: RestoreOptions) -> None:
        """Some tables only (shared.formats.mytables): their sections as the dump wrote
        them (DROP TABLE, CREATE TABLE, rows, triggers), nothing else reaches the client.
        Not one transaction (MySQL commits each DDL): a failure is rolled back from the
        safety backup of those tables by the procedure."""
        cut = MyTableCut(set(options.tables))
        tool = find_tool("mariadb", "mysql")
        seen: list[Blocker] = []

        async def source() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                progress.add_bytes(len(chunk))
                if out := cut.feed(chunk):
                    yield out
            yield cut.finish()

        with defaults_file(target) as cnf:
            argv = [tool, f"--defaults-file={cnf}", *await client_guard_flags(tool), "--",
                    conn_params(target)["database"]]
            async with my_blockers.watch_blockers(target, progress, seen, options.terminate), \
                    spawn(argv, env={}, secrets=target.secrets(), stdin=True) as child:
                with restore_errors(target, "MySQL"):
                    try:
                        await feed_stdin(child, b"", source(), lambda n: None)
                    except (UnsafeScript, RefusedStatement) as exc:
                        raise RestoreFailed(f"the backup was refused: {exc.message}",
                                            database_unchanged=not cut.sent,
                                            code=exc.code) from None
                rc = await child.wait()
        if rc != 0:
            raise RestoreFailed(f"{tool} exited with code {rc}: {child.error_text()}",
                                database_unchanged=not cut.sent)
        progress.log("tables restored as dumped: " + ", ".join(sorted(options.tables)))

    async def _accounts_plan(self, target: TargetConfig, manifest: Mapping[str, object],
                             options: RestoreOptions, head: GlobalsHead) -> accts.Plan:
        """What to do with the accounts at the backup's head, decided before anything is
        sent: refused (`roles_missing`) when the server lacks some and no choice was made."""
        if not head.lines or options.scratch:
            return accts.Plan()
        backup_db = manifest.get("database")
        found = accts.parse(head.lines, backup_db if isinstance(backup_db, str) and backup_db
                            else conn_params(target)["database"], head.first_line)
        if options.roles == "skip":
            return accts.plan(found, set(), database="", choice="skip", mysql=False)
        existing, mariadb = await self._existing_accounts(target)
        missing = accts.missing(found, existing)
        if missing and options.roles != "create":
            raise RestoreFailed(
                f"the backup's grants name accounts this server does not have: "
                f"{', '.join(missing[:50])}{' …' if len(missing) > 50 else ''}. Nothing was "
                "changed. Choose: \"roles\": \"create\" (created as the backup describes "
                "them, with their password hashes) or \"roles\": \"skip\" (no account or "
                "grant is touched)", database_unchanged=True, code="roles_missing")
        return accts.plan(found, existing, database=conn_params(target)["database"],
                          choice=options.roles, mysql=not mariadb)



CLEAN_LOCK_LINE = 3  # the clean's LOCK TABLES: an error at or before it changed nothing


_ERROR_LINE = re.compile(r"ERROR (\d+) \(\w+\) at line (\d+)")
