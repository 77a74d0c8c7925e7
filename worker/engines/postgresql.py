"""PostgreSQL: `pg_dump` plain SQL out, `psql --single-transaction` in.

The password travels only in the child's `PGPASSWORD`; host, port, user and database in
`PG*` variables too, so argv holds nothing about the connection. A clean restore drops the
schemas the dump contains inside the same transaction as the load, so any SQL error rolls
the whole thing back and the database is left exactly as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import (
    DumpFailed,
    EngineError,
    PipelineError,
    RestoreFailed,
    SafeholdError,
    ToolTooOld,
)
from shared.formats.pgscript import PgScriptGuard, UnsafeScript
from shared.outage import RedisUnavailable
from worker.engines import (
    NO_OPTIONS,
    Blocker,
    Drill,
    Dump,
    RestoreOptions,
    blockers_watched,
    describe,
    drill_name,
    pg_globals,
    server_sets,
    stale_drills,
    unreachable,
)
from worker.progress import Progress
from worker.subproc import Child, feed_stdin, spawn

CHUNK = 1 << 20
SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema', 'pg_toast')"
_VERBOSE = re.compile(r"^pg_dump: (?!error|warning|detail|hint)")
_TABLE_DONE = re.compile(r'^pg_dump: dumping contents of table "(?P<name>.+)"$')
# psql exit codes: 3 = an SQL error stopped the script (ON_ERROR_STOP)
PSQL_SCRIPT_ERROR = 3


def _conn(target: TargetConfig) -> dict[str, Any]:
    u = urlsplit(target.url)
    q = parse_qs(u.query)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 5432,
        "user": unquote(u.username or "postgres"),
        "database": unquote(u.path.lstrip("/")) or unquote(u.username or "postgres"),
        "sslmode": q.get("sslmode", [None])[0],
    }


def _env(target: TargetConfig) -> dict[str, str]:
    c = _conn(target)
    env = {"PGHOST": c["host"], "PGPORT": str(c["port"]), "PGUSER": c["user"],
           "PGDATABASE": c["database"], "PGCONNECT_TIMEOUT": "10",
           "PGAPPNAME": "safehold"}
    if c["sslmode"]:
        env["PGSSLMODE"] = c["sslmode"]
    if target.password is not None:
        env["PGPASSWORD"] = target.password.reveal()
    return env



def _quote_ident(name: str) -> str:
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


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_SCHEMA_PRIVS = {"U": "USAGE", "C": "CREATE"}


def _grants(schema: str, acl: list[str], owner: str) -> list[str]:
    """GRANT statements re-creating a schema's ACL items (`grantee=UC/grantor`)."""
    out = []
    for item in acl:
        grantee, _, rest = item.partition("=")
        privs = rest.split("/", 1)[0]
        grantee = grantee.strip('"')
        if grantee == owner:
            continue  # the owner's privileges are implicit
        names = [_SCHEMA_PRIVS[c] for c in privs if c in _SCHEMA_PRIVS]
        if names:
            who = "PUBLIC" if grantee == "" else _quote_ident(grantee)
            out.append(f"GRANT {', '.join(names)} ON SCHEMA {_quote_ident(schema)} TO {who};")
    return out


@dataclass
class RoleFacts:
    """What a restore learnt about roles before it changed anything."""

    with_globals: bool = False  # the manifest says the backup carries the server's globals
    wanted: list[str] = field(default_factory=list)  # the roles the backup names
    missing: list[str] = field(default_factory=list)  # … that the server lacks
    superuser: bool = False  # the restoring role


class PostgreSQL:
    name: ClassVar[str] = "postgresql"
    extension: ClassVar[str] = ENGINES["postgresql"].extension
    atomic_restore: ClassVar[bool] = True

    @asynccontextmanager
    async def connect(self, target: TargetConfig) -> AsyncIterator[asyncpg.Connection]:
        c = _conn(target)
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

    def row_counter(self) -> CopyRows:
        """Counts rows from the dump stream (recorded in the manifest for drills)."""
        return CopyRows()

    @property
    def drill(self) -> PostgreSQLDrill:
        return PostgreSQLDrill()

    async def ping(self, target: TargetConfig) -> None:
        async with self.connect(target) as conn:
            await conn.fetchval("SELECT 1")

    async def _catalog(self, conn: asyncpg.Connection, *, exact_sizes: bool = False
                       ) -> dict[str, Any]:
        """Server version, schemas, tables. Sizes are estimates from pg_class unless
        `exact_sizes` (pg_table_size waits for table locks; the estimate never blocks)."""
        size = ("pg_table_size(c.oid)" if exact_sizes else
                "(c.relpages::bigint + coalesce(t.relpages, 0)) "
                "* current_setting('block_size')::bigint")
        version = await conn.fetchval("SHOW server_version")
        version_num = int(await conn.fetchval("SHOW server_version_num"))
        schemas = [r["nspname"] for r in await conn.fetch(
            f"SELECT nspname FROM pg_namespace WHERE nspname NOT IN {SYSTEM_SCHEMAS} "
            "AND nspname NOT LIKE 'pg_temp_%' AND nspname NOT LIKE 'pg_toast_temp_%' "
            "ORDER BY nspname")]
        tables = await conn.fetch(
            "SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind, "
            f"  c.reltuples::bigint AS rows, {size} AS bytes "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_class t ON t.oid = c.reltoastrelid "
            f"WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN {SYSTEM_SCHEMAS} "
            "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid "
            "                AND d.deptype = 'e') "
            "ORDER BY 1, 2")
        return {"version": version, "version_num": version_num, "schemas": schemas,
                "tables": [dict(r) for r in tables]}

    async def stats(self, target: TargetConfig) -> dict[str, Any]:
        if target.is_set:
            return await server_sets.stats_set(self, target)
        async with self.connect(target) as conn:
            cat = await self._catalog(conn, exact_sizes=True)
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
            name = await conn.fetchval("SELECT current_database()")
        return {
            "engine": self.name,
            "server_version": cat["version"],
            "database": name,
            "size_bytes": size,
            "schemas": cat["schemas"],
            "table_count": len(cat["tables"]),
            "tables": [
                {"schema": t["schema"], "name": t["name"],
                 "partitioned": t["kind"] == "p",
                 "rows_estimate": t["rows"] if t["rows"] >= 0 else None,
                 "size_bytes": t["bytes"]}
                for t in cat["tables"]
            ],
        }

    @asynccontextmanager
    async def dump(self, target: TargetConfig, progress: Progress,
                   options: dict[str, Any] | None = None) -> AsyncIterator[Dump]:
        if target.is_set:  # a server target: every database, one set (server_sets)
            async with server_sets.dump_set(self, target, progress, options) as dumped:
                yield dumped
            return
        async with self.connect(target) as conn:
            cat = await self._catalog(conn)
            database = await conn.fetchrow(
                "SELECT pg_get_userbyid(datdba) AS owner, pg_encoding_to_char(encoding) AS "
                "encoding, datcollate, datctype FROM pg_database "
                "WHERE datname = current_database()")
        major, tool_version = await tool_major("pg_dump")
        server_major = cat["version_num"] // 10000
        if major < server_major:
            raise ToolTooOld(
                f"pg_dump {major} is older than the PostgreSQL {server_major} server of target "
                f"'{target.id}'; install postgresql-client-{server_major} or newer"
            )
        leaf_tables = [t for t in cat["tables"] if t["kind"] == "r"]
        estimate = sum(t["bytes"] for t in leaf_tables)
        if not estimate and leaf_tables:  # never vacuumed or analysed: relpages are 0
            async with self.connect(target) as conn:
                estimate = int(await conn.fetchval(
                    "SELECT pg_database_size(current_database())"))
        progress.item_kind = "tables"
        progress.set_phase("dumping", bytes_total=estimate or None,
                           items_total=len(leaf_tables))

        def on_line(line: str) -> None:
            if _TABLE_DONE.match(line):
                progress.items_done += 1

        # owners, grants, default privileges and policies as pg_dump writes them by
        # default: a restore gives the application its access back (issue 21)
        flags = ["--format=plain", "--verbose", "--no-password"]
        async with self.connect(target) as conn:
            roles = [r[0] for r in await conn.fetch(_ROLES_REFERENCED)]
            # without SELECT on pg_authid, pg_dumpall reads pg_roles (no passwords)
            passwords = bool(await conn.fetchval(
                "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')"))
        globals_argv = ["pg_dumpall", "--globals-only", "--no-password",
                        "-l", _conn(target)["database"],
                        *([] if passwords else ["--no-role-passwords"])]
        async with spawn(["pg_dump", *flags], env=_env(target), secrets=target.secrets(),
                         stdout=True, on_line=on_line) as child:
            async def chunks() -> AsyncIterator[bytes]:
                if target.globals:  # first, as comments (see pg_globals)
                    yield pg_globals.header(passwords)
                    async for data in pg_globals.commented(self._globals(target,
                                                                         globals_argv)):
                        yield data
                while data := await child.read():
                    yield data

            yield Dump(chunks(), {
                "server_version": cat["version"],
                "tool": "pg_dump",
                "tool_version": tool_version,
                "options": flags,
                "schemas": cat["schemas"],
                # estimates; null for a table never analysed (reltuples -1), never 0
                "counts": {f"{t['schema']}.{t['name']}":
                           int(t["rows"]) if t["rows"] >= 0 else None for t in leaf_tables},
                "count_kind": "rows_estimate",
                # the roles its owners, grants and policies name (a restore on a server
                # lacking some needs a choice: roles = "create" | "skip")
                "roles": roles,
                "database_owner": database["owner"],
                "database_options": {"encoding": database["encoding"],
                                     "lc_collate": database["datcollate"],
                                     "lc_ctype": database["datctype"]},
                **({"globals": {"tool": " ".join(globals_argv[:2]),
                                "role_passwords": passwords}} if target.globals else {}),
            })
            rc = await child.wait()
            if rc != 0:
                raise DumpFailed(f"pg_dump exited with code {rc}: "
                                 f"{child.error_text(skip=lambda ln: bool(_VERBOSE.match(ln)))}")
            progress.items_done = progress.items_total or progress.items_done

    async def server_databases(self, target: TargetConfig) -> list[str]:
        async with self.connect(target) as conn:
            return [r[0] for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                "ORDER BY datname")]

    async def create_database(self, target: TargetConfig, name: str, facts: dict[str, Any],
                              progress: Progress) -> bool:
        """A set's database on a server that lacks it (a new server): created as it was
        (encoding, locale). True when it was created."""
        async with self.connect(target) as conn:
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                return False
            opts = facts.get("database_options")
            opts = opts if isinstance(opts, dict) else {}
            clauses = " ".join(f"{k.upper()} {_quote_literal(str(opts[k]))}"
                               for k in ("encoding", "lc_collate", "lc_ctype")
                               if isinstance(opts.get(k), str) and opts[k]
                               and len(opts[k]) < 64)
            try:
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0 "
                                   + clauses)
            except asyncpg.PostgresError as exc:
                if not clauses:
                    raise RestoreFailed(f"cannot create database {name}: {exc}",
                                        database_unchanged=True) from None
                progress.warn(f"database {name} created with this server's default encoding "
                              f"and locale: its own ({clauses}) failed here ({exc})")
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0")
        progress.log(f"created database {name}")
        return True

    async def drop_database(self, target: TargetConfig, name: str) -> None:
        async with self.connect(target) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    async def database_restored(self, target: TargetConfig, name: str,
                                facts: dict[str, Any]) -> None:
        """The database back to its owner (when that role exists: a restore with
        roles = "create" has just made it)."""
        owner = facts.get("database_owner")
        if not isinstance(owner, str) or not owner:
            return
        async with self.connect(target) as conn:
            current = await conn.fetchval(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", name)
            if current not in (None, owner) and await conn.fetchval(
                    "SELECT 1 FROM pg_roles WHERE rolname = $1", owner):
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute(f"ALTER DATABASE {_quote_ident(name)} OWNER TO "
                                       f"{_quote_ident(owner)}")

    async def precheck(self, target: TargetConfig, facts: dict[str, Any],
                       options: RestoreOptions) -> None:
        await self._missing_roles(target, facts, options)  # roles are the server's

    async def _globals(self, target: TargetConfig, argv: list[str]) -> AsyncIterator[bytes]:
        """pg_dumpall --globals-only's output, streamed."""
        async with spawn(argv, env=_env(target), secrets=target.secrets(),
                         stdout=True) as child:
            while data := await child.read():
                yield data
            rc = await child.wait()
            if rc != 0:
                raise DumpFailed(f"pg_dumpall --globals-only exited with code {rc}: "
                                 f"{child.error_text()}")

    async def _clean_sql(self, target: TargetConfig) -> str:
        """SQL that empties the database of everything a plain pg_dump can hold, as one line
        (run inside Safehold's transaction, before the dump).

        Schemas go with CASCADE; then what lives outside schemas and a schema drop does not
        reach: event triggers (first, so none fires during the clean), subscriptions
        (disabled and detached from their slot, so nothing is done on a publisher),
        publications, extensions, foreign-data wrappers, servers and user mappings, casts,
        transforms, procedural languages, access methods and large objects. Objects that
        belong to an extension go with it. `public` is not created by pg_dump (initdb makes
        it), so it is recreated as it is now: owner, comment and grants."""
        not_ext = ("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{cat}'::regclass "
                   "AND d.objid = x.oid AND d.deptype = 'e')")
        async with self.connect(target) as conn:
            schemas = (await self._catalog(conn))["schemas"]
            public = await conn.fetchrow(
                "SELECT pg_get_userbyid(nspowner) AS owner, "
                "  obj_description(oid, 'pg_namespace') AS comment, "
                "  coalesce(nspacl::text[], '{}') AS acl "
                "FROM pg_namespace WHERE nspname = 'public'")

            async def names(sql: str, cat: str = "") -> list[str]:
                where = f" AND {not_ext.format(cat=cat)}" if cat else ""
                return [r[0] for r in await conn.fetch(sql + where)]

            event_triggers = await names("SELECT quote_ident(evtname) FROM pg_event_trigger x "
                                         "WHERE true", "pg_event_trigger")
            subscriptions = await names(
                "SELECT quote_ident(subname) FROM pg_subscription x WHERE subdbid = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())")
            publications = await names("SELECT quote_ident(pubname) FROM pg_publication")
            extensions = await names("SELECT quote_ident(extname) FROM pg_extension "
                                     "WHERE extname <> 'plpgsql'")
            servers = await names("SELECT quote_ident(srvname) FROM pg_foreign_server x "
                                  "WHERE true", "pg_foreign_server")
            wrappers = await names("SELECT quote_ident(fdwname) FROM pg_foreign_data_wrapper x "
                                   "WHERE true", "pg_foreign_data_wrapper")
            casts = await names(
                "SELECT format('(%s AS %s)', format_type(castsource, NULL), "
                "format_type(casttarget, NULL)) FROM pg_cast x WHERE oid >= 16384", "pg_cast")
            transforms = await names(
                "SELECT format('FOR %s LANGUAGE %I', format_type(trftype, NULL), "
                "(SELECT lanname FROM pg_language WHERE oid = trflang)) "
                "FROM pg_transform x WHERE oid >= 16384", "pg_transform")
            languages = await names("SELECT quote_ident(lanname) FROM pg_language x "
                                    "WHERE oid >= 16384", "pg_language")
            access_methods = await names("SELECT quote_ident(amname) FROM pg_am x "
                                         "WHERE oid >= 16384", "pg_am")
        sql = ["SET LOCAL client_min_messages = warning;"]
        sql += [f"DROP EVENT TRIGGER IF EXISTS {e} CASCADE;" for e in event_triggers]
        for s in subscriptions:
            sql += [f"ALTER SUBSCRIPTION {s} DISABLE;",
                    f"ALTER SUBSCRIPTION {s} SET (slot_name = NONE);",
                    f"DROP SUBSCRIPTION {s};"]
        sql += [f"DROP PUBLICATION IF EXISTS {p};" for p in publications]
        sql += [f"DROP SCHEMA IF EXISTS {_quote_ident(s)} CASCADE;" for s in schemas]
        sql += [f"DROP EXTENSION IF EXISTS {e} CASCADE;" for e in extensions]
        sql += [f"DROP SERVER IF EXISTS {s} CASCADE;" for s in servers]
        sql += [f"DROP FOREIGN DATA WRAPPER IF EXISTS {w} CASCADE;" for w in wrappers]
        sql += [f"DROP CAST IF EXISTS {c} CASCADE;" for c in casts]
        sql += [f"DROP TRANSFORM IF EXISTS {t} CASCADE;" for t in transforms]
        sql += [f"DROP LANGUAGE IF EXISTS {la} CASCADE;" for la in languages]
        sql += [f"DROP ACCESS METHOD IF EXISTS {a} CASCADE;" for a in access_methods]
        sql.append("SELECT count(lo_unlink(oid)) FROM pg_largeobject_metadata;")
        if "public" in schemas:
            sql.append("CREATE SCHEMA public;")
            if public is not None:
                sql.append(f"ALTER SCHEMA public OWNER TO {_quote_ident(public['owner'])};")
                if public["comment"] is not None:
                    sql.append(f"COMMENT ON SCHEMA public IS {_quote_literal(public['comment'])};")
                sql += _grants("public", public["acl"], public["owner"])
        return " ".join(sql)

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: dict[str, Any],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        """Feed the guarded script to psql inside one transaction that Safehold opens and
        commits itself, only after the whole stream was read, checked and verified.

        psql runs under a `\\restrict` key only this process knows (no meta-command from the
        file can run), with ON_ERROR_STOP. If the worker dies, psql dies with it (or reads
        end-of-input without a COMMIT): the server rolls the transaction back."""
        if target.is_set:  # every database of the set, or the one asked for
            await server_sets.restore_set(self, target, chunks, progress, clean=clean,
                                          manifest=manifest, options=options)
            return
        key = secrets.token_hex(24)
        tag = f"safehold-restore-{secrets.token_hex(6)}"  # psql's application_name
        try:  # nothing has been touched yet
            await require_restrict_psql()
            facts = await self._missing_roles(target, manifest, options)
            clean_sql = await self._clean_sql(target) if clean else ""
        except SafeholdError as exc:
            raise RestoreFailed(exc.message, database_unchanged=True, code=exc.code) from None
        roles_plan = pg_globals.Plan()

        async def prelude(head: pg_globals.GlobalsHead | None) -> bytes:
            """psql prints `safehold-begin-KEY|<txid>` right after BEGIN and, after the
            whole script, `safehold-ready-KEY|<txid>`: the same txid proves that nothing in
            the script ended Safehold's transaction (the key is unknown to the file; the
            calls are schema-qualified so the file cannot shadow them). The clean takes
            every table's lock: it waits at most lock_timeout for the application's
            sessions, then fails, and the transaction rolls back (unchanged). Roles to
            create (from the backup's globals when it has them) come first."""
            nonlocal roles_plan
            if head is not None:
                roles_plan = await self._roles_plan(target, facts, head)
            return (f"\\restrict {key}\nBEGIN; SET LOCAL lock_timeout = "
                    f"{int(target.lock_timeout * 1000)}; SELECT 'safehold-begin-{key}', "
                    f"pg_catalog.txid_current(); {roles_plan.sql} {clean_sql}\n").encode()
        guard = PgScriptGuard(skip_privileges=options.roles == "skip",
                              role_map=dict(options.owner_map) if options.roles == "map"
                              else None)
        argv = ["psql", "-X", "-q", "-A", "-t", "--no-password", "-v", "ON_ERROR_STOP=1",
                "-f", "-"]
        seen: list[Blocker] = []
        async with self._blockers(target, tag, progress, seen, options.terminate), \
                spawn(argv, env={**_env(target), "PGAPPNAME": tag},
                      secrets=target.secrets(), stdin=True, stdout=True) as child:
            markers = asyncio.ensure_future(_read_markers(child, key))

            async def guarded() -> AsyncIterator[bytes]:
                # roles = "create" reads the backup's globals (its head) before BEGIN
                head = pg_globals.GlobalsHead() if options.roles == "create" else None
                opened = False
                async for chunk in chunks:  # ends only after the stored sha256 was verified
                    progress.add_bytes(len(chunk))
                    if not opened:
                        if head is not None:
                            head.feed(chunk)
                            if not head.done:
                                continue
                            chunk = bytes(head.held)
                        yield await prelude(head)
                        opened = True
                    if out := guard.feed(chunk):
                        yield out
                if not opened:
                    if head is not None:
                        head.finish()
                    yield await prelude(head)
                    if head is not None and (out := guard.feed(bytes(head.held))):
                        yield out
                # everything before COMMIT must have run: psql answers the marker only then,
                # so a worker lost before this point always leaves the database unchanged
                yield guard.finish() + (f"\nSELECT 'safehold-ready-{key}', "
                                        "pg_catalog.txid_current();\n").encode()
                found = await _await_markers(child, markers)
                if found is None:
                    return  # psql stopped on an error: end of input, no COMMIT
                if found[0] is None or found[0] != found[1]:
                    raise RestoreFailed(
                        "the script ended Safehold's transaction before its end (a statement "
                        "the guard did not recognise as transaction control): what followed "
                        "was committed statement by statement", code="unsafe_backup")
                await progress.enter_stage("committing")
                yield b"COMMIT;\n"

            try:
                await feed_stdin(child, b"", guarded(), lambda n: None)
            except UnsafeScript as exc:
                raise RestoreFailed(f"the backup was refused: {exc.message}",
                                    database_unchanged=True, code=exc.code) from None
            except PipelineError as exc:  # psql was killed before COMMIT: nothing committed
                raise RestoreFailed(f"reading the backup failed ({exc.message}); "
                                    "the transaction was not committed",
                                    database_unchanged=True, code=exc.code) from None
            except RedisUnavailable as exc:  # recording "committing" failed: no COMMIT sent
                raise RestoreFailed(f"{exc.message}; the transaction was not committed",
                                    database_unchanged=True, code=exc.code) from None
            finally:
                markers.cancel()
            rc = await child.wait()
        if rc == 0:
            if guard.skipped:
                progress.warn(f"roles = \"skip\": {len(guard.skipped)} owner and grant "
                              "statement(s) of the backup were left out: "
                              + "; ".join(guard.skipped[:200])
                              + (" …" if len(guard.skipped) > 200 else ""))
            if guard.mapped:
                progress.log(f"roles = \"map\": {guard.mapped} owner, grant and policy "
                             "statement(s) renamed their roles ("
                             + ", ".join(f"{a} → {b}" for a, b in options.owner_map) + ")")
            if roles_plan.created:
                progress.warn(f"roles = \"create\": created {', '.join(roles_plan.created)}"
                              + (" as the backup's globals describe them" if
                                 facts.with_globals else " (NOLOGIN, no password: give them "
                                 "a password and LOGIN where the application logs in as "
                                 "them; a backup taken with [targets.<t>] globals = true "
                                 "carries them)"))
            for warning in roles_plan.warnings:
                progress.warn(f"roles = \"create\": {warning}")
            for kind, n in sorted(guard.counts.items()):
                if kind == "CREATE SUBSCRIPTION":
                    progress.warn(f"{n} subscription(s) restored DISABLED (pg_dump creates them "
                                  "with connect = false): check the publisher, then ALTER "
                                  "SUBSCRIPTION … ENABLE and REFRESH PUBLICATION")
            return
        detail = _backup_lines(child.error_text(), PRELUDE_LINES)
        if rc == PSQL_SCRIPT_ERROR and "due to lock timeout" in detail:
            raise RestoreFailed(
                f"the restore waited {target.lock_timeout:g} s for locks held by "
                f"{describe(seen) or 'other sessions'} and gave up; its transaction was "
                "rolled back. End those sessions (or restore with "
                "\"terminate_connections\": true, or raise "
                f"[targets.{target.id}] lock_timeout) and restore again",
                database_unchanged=True, code="lock_timeout")
        if rc == PSQL_SCRIPT_ERROR:
            raise RestoreFailed(f"psql stopped on an SQL error and rolled back: {detail}",
                                database_unchanged=True)
        raise RestoreFailed(f"psql exited with code {rc}: {detail}",
                            database_unchanged=not progress.stage_reached("committing"))


    async def _missing_roles(self, target: TargetConfig, manifest: dict[str, Any],
                             options: RestoreOptions) -> RoleFacts:
        """The roles the backup names that the server lacks; refuses the restore before
        anything changes when there are some and no choice was made (or the map does not
        cover them). The list comes from the manifest (untrusted: names only; a role it
        left out fails the load, which rolls back)."""
        named = manifest.get("roles")
        facts = RoleFacts(with_globals=isinstance(manifest.get("globals"), dict))
        if options.roles == "skip" or not isinstance(named, list):
            return facts
        facts.wanted = sorted({r for r in named if isinstance(r, str) and 0 < len(r) <= 63
                               and "\0" not in r})[:10_000]
        mapping = dict(options.owner_map) if options.roles == "map" else {}
        async with self.connect(target) as conn:  # the backup's roles and the map's
            have = {r[0] for r in await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])",
                sorted({*facts.wanted, *mapping.values()}))}
            facts.superuser = bool(await conn.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
        facts.missing = [r for r in facts.wanted if r not in have]
        if options.roles == "map":
            absent = sorted(set(mapping.values()) - have)
            unmapped = [r for r in facts.missing if r not in mapping]
            if absent or unmapped:
                raise RestoreFailed(
                    "owner_map does not cover this server: "
                    + (f"roles it maps to do not exist: {', '.join(absent)}; " if absent
                       else "")
                    + (f"roles the backup names that the server lacks and the map leaves "
                       f"out: {', '.join(unmapped[:50])}" if unmapped else "")
                    + ". Nothing was changed", database_unchanged=True, code="roles_missing")
            return facts
        if not facts.missing or options.roles == "create":
            return facts
        raise RestoreFailed(
            f"the backup's owners and grants name roles this server does not have: "
            f"{', '.join(facts.missing[:50])}{' …' if len(facts.missing) > 50 else ''}. "
            "Nothing was changed. Choose: \"roles\": \"create\" (as the backup's globals "
            "describe them, else NOLOGIN without passwords), \"roles\": \"map\" with "
            "\"owner_map\": {\"old\": \"new\"}, or \"roles\": \"skip\" (owners and grants "
            "left out, listed in the result)",
            database_unchanged=True, code="roles_missing")

    async def _roles_plan(self, target: TargetConfig, facts: RoleFacts,
                          head: pg_globals.GlobalsHead) -> pg_globals.Plan:
        """roles = "create": the SQL creating what the database needs that the server
        lacks — from the backup's globals when its head has them (attributes, passwords,
        memberships, settings), else the missing roles NOLOGIN."""
        database = _conn(target)["database"]
        if not head.lines:
            return pg_globals.plan(pg_globals.Globals(), facts.missing, set(),
                                   database=database, superuser=facts.superuser)
        found = pg_globals.parse(head.lines, head.first_line)
        names = sorted({*found.roles, *facts.wanted})
        async with self.connect(target) as conn:
            existing = {r[0] for r in await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])", names)}
            contexts = {r[0]: r[1] for r in await conn.fetch(
                "SELECT name, context FROM pg_settings")}

        def settable(name: str) -> bool:  # by any user (an extension not loaded now
            return contexts.get(name) == "user"  # may make its setting superuser-only)
        return pg_globals.plan(found, facts.wanted, existing, database=database,
                               superuser=facts.superuser, settable=settable)

    @asynccontextmanager
    async def _blockers(self, target: TargetConfig, tag: str, progress: Progress,
                        seen: list[Blocker], terminate: bool) -> AsyncIterator[None]:
        """While the load runs: the sessions that block psql (`tag`), from
        `pg_blocking_pids`, shown in the job's progress; with `terminate`, the database's
        other sessions are ended at the start and any blocker as it appears. (New
        sessions are not refused with ALLOW_CONNECTIONS: a worker killed meanwhile would
        leave the database closed. They cannot hold the restore up: their lock requests
        queue behind the restore's, and one that blocks it is ended too.)"""
        async with contextlib.AsyncExitStack() as stack:
            try:
                conn = await stack.enter_async_context(self.connect(target))
            except EngineError as exc:  # before psql started: nothing touched
                raise RestoreFailed(exc.message, database_unchanged=True,
                                    code=exc.code) from None

            async def find() -> list[Blocker]:
                return [_blocker(r) for r in await conn.fetch(_BLOCKERS, tag)]

            async def end(blockers: list[Blocker]) -> None:
                await _terminate(conn, [int(b["id"]) for b in blockers], progress, target)

            async def others() -> list[Blocker]:
                return [_blocker(r) for r in await conn.fetch(_SESSIONS, tag)]

            async with blockers_watched(progress, seen, find, end,
                                        others if terminate else None):
                yield


_USER_SCHEMAS = ("NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
                 "AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%'")
# every role the database's dump names: owners, grantees (column grants and default
# privileges too), policy roles (grantee 0 is PUBLIC: no role)
_ROLES_REFERENCED = f"""
WITH refs(r) AS (
  SELECT n.nspowner FROM pg_namespace n WHERE n.nspname {_USER_SCHEMAS}
  UNION SELECT (aclexplode(n.nspacl)).grantee FROM pg_namespace n
    WHERE n.nspacl IS NOT NULL AND n.nspname {_USER_SCHEMAS}
  UNION SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname {_USER_SCHEMAS}
  UNION SELECT (aclexplode(c.relacl)).grantee FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relacl IS NOT NULL AND n.nspname {_USER_SCHEMAS}
  UNION SELECT (aclexplode(a.attacl)).grantee FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.attacl IS NOT NULL AND n.nspname {_USER_SCHEMAS}
  UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname {_USER_SCHEMAS}
  UNION SELECT (aclexplode(p.proacl)).grantee FROM pg_proc p
    JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.proacl IS NOT NULL AND n.nspname {_USER_SCHEMAS}
  UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname {_USER_SCHEMAS}
  UNION SELECT (aclexplode(t.typacl)).grantee FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE t.typacl IS NOT NULL AND n.nspname {_USER_SCHEMAS}
  UNION SELECT unnest(polroles) FROM pg_policy
  UNION SELECT defaclrole FROM pg_default_acl
  UNION SELECT (aclexplode(defaclacl)).grantee FROM pg_default_acl
  UNION SELECT evtowner FROM pg_event_trigger
  UNION SELECT pubowner FROM pg_publication
  UNION SELECT lomowner FROM pg_largeobject_metadata
  UNION SELECT (aclexplode(lomacl)).grantee FROM pg_largeobject_metadata
    WHERE lomacl IS NOT NULL
  UNION SELECT srvowner FROM pg_foreign_server
  UNION SELECT fdwowner FROM pg_foreign_data_wrapper
  UNION SELECT umuser FROM pg_user_mappings
)
SELECT rolname FROM pg_roles WHERE oid IN (SELECT r FROM refs) ORDER BY 1"""
_SESSION_COLUMNS = ("b.pid, b.usename, b.application_name, host(b.client_addr) AS client, "
                    "b.state, coalesce(b.xact_start, b.state_change) AS since")
_BLOCKERS = (f"SELECT DISTINCT {_SESSION_COLUMNS} FROM pg_stat_activity w "
             "CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS x(pid) "
             "JOIN pg_stat_activity b ON b.pid = x.pid WHERE w.application_name = $1")
_SESSIONS = (f"SELECT {_SESSION_COLUMNS} FROM pg_stat_activity b "
             "WHERE b.datname = current_database() AND b.pid <> pg_backend_pid() "
             "AND b.backend_type = 'client backend' AND b.application_name <> $1")


def _blocker(r: Any) -> Blocker:
    since = r["since"]
    return {"id": r["pid"], "user": r["usename"], "application": r["application_name"] or None,
            "client": r["client"], "state": r["state"],
            "since": since.isoformat(timespec="seconds") if since else None}


async def _terminate(conn: asyncpg.Connection, pids: list[int], progress: Progress,
                     target: TargetConfig) -> None:
    ended = []
    for pid in pids:  # one at a time: a superuser's session refused does not stop the rest
        try:
            if await conn.fetchval("SELECT pg_terminate_backend($1)", pid):
                ended.append(pid)
        except asyncpg.InsufficientPrivilegeError as exc:
            progress.warn(f"could not end session {pid} ({exc}): the role "
                          f"{_conn(target)['user']} needs pg_signal_backend (or to be that "
                          "session's role)")
    if ended:
        progress.log(f"ended {len(ended)} session(s): {', '.join(map(str, ended))}")


STUCK_CHECKS = 3  # looks, a second apart, at a psql blocked reading its empty input


async def _read_markers(child: Child, key: str) -> tuple[bytes | None, bytes] | None:
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


async def _await_markers(child: Child, markers: asyncio.Future[
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
        stuck = stuck + 1 if _blocked_reading_stdin(child.proc.pid) else 0
        if stuck >= STUCK_CHECKS:
            raise RestoreFailed(
                "psql is still waiting for input after the end of the backup: the script "
                "does not end where it seems to; nothing was committed",
                database_unchanged=True, code="unsafe_backup")


def _blocked_reading_stdin(pid: int) -> bool:
    """Linux: the process sits in read(0, …) (x86-64 and arm64 syscall numbers)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) >= 2 and fields[0] in ("0", "63") and fields[1] == "0x0"


PRELUDE_LINES = 2  # "\\restrict KEY" and "BEGIN; <clean>" come before the backup's line 1
_PSQL_LINE = re.compile(r"psql:<stdin>:(\d+):")


def _backup_lines(text: str, offset: int) -> str:
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


class CopyRows:
    r"""Exact row counts of a plain pg_dump, taken from the stream as it is dumped: the lines
    of each table-data `COPY … FROM stdin;` block up to its `\.` (C-speed find/count; a
    block's rows are never kept, so a 1 GiB value costs one pass). Only a COPY header that
    follows pg_dump's `-- Data for Name: …; Type: TABLE DATA` comment counts: the same text
    inside a function body or a comment does not."""

    _MARK = b"\n-- Data for Name: "

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
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
                    self._tail = buf[keep:]
                    return
                self.counts[self._table] += buf.count(b"\n", pos, k)
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
                self._table = _copy_table(header[5:].decode("utf-8", "replace"))
                self.counts[self._table] = 0
            pos = j

    def result(self) -> dict[str, Any]:
        return {"exact_counts": self.counts, "exact_count_kind": "rows"}


def _copy_table(rest: str) -> str:
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


async def _drop_scratch(target: TargetConfig, scratch: TargetConfig, name: str) -> None:
    """Drop a drill's database: detach any subscription the dump brought (they block DROP
    DATABASE), then DROP … WITH (FORCE), or end its sessions first before PostgreSQL 13."""
    with contextlib.suppress(Exception):
        async with PostgreSQL().connect(scratch) as conn:
            for (sub,) in await conn.fetch(
                    "SELECT quote_ident(subname) FROM pg_subscription WHERE subdbid = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"):
                await conn.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
                await conn.execute(f"ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)")
                await conn.execute(f"DROP SUBSCRIPTION {sub}")
    async with PostgreSQL().connect(target) as conn:
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")
        except asyncpg.PostgresSyntaxError:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = $1", name)
            await conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgreSQLDrill(Drill):
    """Restore drills: a scratch database on the target's server (the target's role needs
    CREATEDB), exact row counts of every table, user checks, dropped afterwards."""

    async def sweep(self, target: TargetConfig, max_age: float) -> list[str]:
        """Drop scratch databases a killed drill left behind (older than any drill runs)."""
        async with PostgreSQL().connect(target) as conn:
            names = [r[0] for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'safehold\\_drill\\_%'")]
        stale = stale_drills(names, max_age)
        for name in stale:
            u = urlsplit(target.url)
            await _drop_scratch(target, replace(target, url=u._replace(path=f"/{name}")
                                                .geturl()), name)
        return stale

    @asynccontextmanager
    async def scratch(self, target: TargetConfig) -> AsyncIterator[TargetConfig]:
        name = drill_name()
        self.last_scratch = f"database {name}"
        async with PostgreSQL().connect(target) as conn:
            # owned like the target's database: a backup's objects in `public` may belong
            # to the database owner, who needs CREATE there to own them (pg_database_owner)
            owner = await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                        "WHERE datname = current_database()")
            try:
                try:
                    await conn.execute(f"CREATE DATABASE {_ident(name)} OWNER "
                                       f"{_quote_ident(owner)}")
                except asyncpg.InsufficientPrivilegeError:  # not a member of that owner
                    await conn.execute(f"CREATE DATABASE {_ident(name)}")
            except asyncpg.PostgresError as exc:
                raise EngineError(
                    f"the drill could not create a scratch database ({exc}); grant CREATEDB "
                    f"to {_conn(target)['user']} or run drills against a scratch server",
                    code="drill_unavailable") from None
        u = urlsplit(target.url)
        scratch = replace(target, url=u._replace(path=f"/{name}").geturl())
        try:
            yield scratch
        finally:
            await _drop_scratch(target, scratch, name)

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        async with PostgreSQL().connect(target) as conn:
            rows = await conn.fetch(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN "
                f"{SYSTEM_SCHEMAS} AND n.nspname NOT LIKE 'pg_temp%'")
            out = {}
            for r in rows:
                qualified = f"{_ident(r['nspname'])}.{_ident(r['relname'])}"
                out[await conn.fetchval("SELECT format('%I.%I', $1::text, $2::text)",
                                        r["nspname"], r["relname"])] = \
                    await conn.fetchval(f"SELECT count(*) FROM ONLY {qualified}")
            return out

    async def check(self, target: TargetConfig, sql: str) -> bool:
        async with PostgreSQL().connect(target) as conn, conn.transaction(readonly=True):
            return bool(await conn.fetchval(sql))
