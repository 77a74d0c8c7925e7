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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import asyncpg

from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import (
    DumpFailed,
    PipelineError,
    RestoreFailed,
    SafeholdError,
    ToolTooOld,
)
from shared.formats.pgscript import PgScriptGuard, UnsafeScript
from shared.formats.pgtables import RefusedSection, TableCut
from shared.jobs import Phase, RestoreStage
from shared.outage import RedisUnavailable
from worker.engines import (
    NO_OPTIONS,
    Blocker,
    Dump,
    DumpOptions,
    RestoreOptions,
    describe,
    pg_globals,
    pg_psql,
    pg_roles,
    pg_tables,
    server_sets,
)
from worker.engines.pg_connection import (
    SYSTEM_SCHEMAS,
    conn_params,
    connect,
    quote_ident,
    quote_literal,
    tool_env,
    tool_major,
)
from worker.engines.pg_drill import CopyRows, PostgreSQLDrill
from worker.engines.pg_psql import (
    PRELUDE_LINES,
    await_markers,
    backup_lines,
    read_markers,
    require_restrict_psql,
)
from worker.progress import Progress
from worker.subproc import Child, feed_stdin, spawn

CHUNK = 1 << 20
_VERBOSE = re.compile(r"^pg_dump: (?!error|warning|detail|hint)")
_TABLE_DONE = re.compile(r'^pg_dump: dumping contents of table "(?P<name>.+)"$')
# psql exit codes: 3 = an SQL error stopped the script (ON_ERROR_STOP)
PSQL_SCRIPT_ERROR = 3


class PostgreSQL:
    name: ClassVar[str] = "postgresql"
    extension: ClassVar[str] = ENGINES["postgresql"].extension
    atomic_restore: ClassVar[bool] = True

    def connect(self, target: TargetConfig) -> contextlib.AbstractAsyncContextManager[
            asyncpg.Connection]:
        return connect(target)

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

    async def stats(self, target: TargetConfig) -> dict[str, object]:
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
                   options: DumpOptions | None = None) -> AsyncIterator[Dump]:
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
        progress.set_phase(Phase.DUMPING, bytes_total=estimate or None,
                           items_total=len(leaf_tables))

        def on_line(line: str) -> None:
            if _TABLE_DONE.match(line):
                progress.items_done += 1

        # owners, grants, default privileges and policies as pg_dump writes them by
        # default: a restore gives the application its access back (issue 21)
        flags = ["--format=plain", "--verbose", "--no-password"]
        only = list((options or {}).get("tables") or [])  # a safety backup of some tables
        if only:
            flags += pg_tables.dump_flags(only)
            wanted = {tuple(r) for r in pg_tables.rels(only)}
            leaf_tables = [t for t in leaf_tables if (t["schema"], t["name"]) in wanted]
        async with self.connect(target) as conn:
            roles = [r[0] for r in await conn.fetch(pg_roles.ROLES_REFERENCED)]
            # without SELECT on pg_authid, pg_dumpall reads pg_roles (no passwords)
            passwords = bool(await conn.fetchval(
                "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')"))
        globals_argv = ["pg_dumpall", "--globals-only", "--no-password",
                        "-l", conn_params(target)["database"],
                        *([] if passwords else ["--no-role-passwords"])]
        async with spawn(["pg_dump", *flags], env=tool_env(target), secrets=target.secrets(),
                         stdout=True, on_line=on_line) as child:
            async def chunks() -> AsyncIterator[bytes]:
                if target.globals and not only:  # first, as comments (pg_globals)
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
                                "role_passwords": passwords}}
                   if target.globals and not only else {}),
                **({"only_tables": only} if only else {}),
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

    async def create_database(self, target: TargetConfig, name: str, facts: Mapping[str, object],
                              progress: Progress) -> bool:
        """A set's database on a server that lacks it (a new server): created as it was
        (encoding, locale). True when it was created."""
        async with self.connect(target) as conn:
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                return False
            opts = facts.get("database_options")
            opts = opts if isinstance(opts, dict) else {}
            clauses = " ".join(f"{k.upper()} {quote_literal(str(opts[k]))}"
                               for k in ("encoding", "lc_collate", "lc_ctype")
                               if isinstance(opts.get(k), str) and opts[k]
                               and len(opts[k]) < 64)
            # owned by its dumped owner from the start where this role may: giving objects
            # to that owner needs its CREATE on `public`, which PostgreSQL 15 grants only to
            # the database's owner (else database_restored gives it over after the load)
            owner = facts.get("database_owner")
            if isinstance(owner, str) and 0 < len(owner) < 64 and await conn.fetchval(
                    "SELECT pg_has_role(current_user, r.oid, 'MEMBER') FROM pg_roles r "
                    "WHERE r.rolname = $1", owner):
                clauses = f"OWNER {quote_ident(owner)} {clauses}"
            try:
                await conn.execute(f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0 "
                                   + clauses)
            except asyncpg.PostgresError as exc:
                if not clauses:
                    raise RestoreFailed(f"cannot create database {name}: {exc}",
                                        database_unchanged=True) from None
                progress.warn(f"database {name} created with this server's default encoding "
                              f"and locale: its own ({clauses}) failed here ({exc})")
                await conn.execute(f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0")
        progress.log(f"created database {name}")
        return True

    async def drop_database(self, target: TargetConfig, name: str) -> None:
        async with self.connect(target) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    async def cannot_create_database(self, target: TargetConfig) -> str | None:
        """Why the target's role may not create a database (None: it may; CREATEDB is an
        attribute, never inherited, so this is the whole answer)."""
        async with self.connect(target) as conn:
            if await conn.fetchval("SELECT rolcreatedb OR rolsuper FROM pg_roles "
                                   "WHERE rolname = current_user"):
                return None
            user = await conn.fetchval("SELECT current_user")
        return f"the role {user} may not create databases: ALTER ROLE {quote_ident(user)} CREATEDB"

    async def database_restored(self, target: TargetConfig, name: str,
                                facts: Mapping[str, object]) -> None:
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
                    await conn.execute(f"ALTER DATABASE {quote_ident(name)} OWNER TO "
                                       f"{quote_ident(owner)}")

    async def make_schemas(self, target: TargetConfig, schemas: Sequence[str],
                           facts: Mapping[str, object]) -> None:
        """Schemas a tables restore into a new database needs, owned by the dumped
        database's owner where this role may (the tables' owners are given them as dumped,
        which needs their CREATE there)."""
        owner = facts.get("database_owner")
        async with self.connect(target) as conn:
            mine = isinstance(owner, str) and 0 < len(owner) < 64 and await conn.fetchval(
                "SELECT pg_has_role(current_user, r.oid, 'MEMBER') FROM pg_roles r "
                "WHERE r.rolname = $1", owner)
            for schema in schemas:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"
                                   + (f" AUTHORIZATION {quote_ident(str(owner))}"
                                      if mine else ""))

    async def tables_present(self, target: TargetConfig, tables: Sequence[str]) -> list[str]:
        return await pg_tables.present(target, tables)

    async def precheck(self, target: TargetConfig, facts: Mapping[str, object],
                       options: RestoreOptions) -> None:
        await pg_roles.missing_roles(target, facts, options)  # roles are the server's

    async def _globals(self, target: TargetConfig, argv: list[str]) -> AsyncIterator[bytes]:
        """pg_dumpall --globals-only's output, streamed."""
        async with spawn(argv, env=tool_env(target), secrets=target.secrets(),
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
        sql += [f"DROP SCHEMA IF EXISTS {quote_ident(s)} CASCADE;" for s in schemas]
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
                sql.append(f"ALTER SCHEMA public OWNER TO {quote_ident(public['owner'])};")
                if public["comment"] is not None:
                    sql.append(f"COMMENT ON SCHEMA public IS {quote_literal(public['comment'])};")
                sql += pg_roles.grants("public", public["acl"], public["owner"])
        return " ".join(sql)

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
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
            facts = await pg_roles.missing_roles(target, manifest, options)
            tables = await pg_tables.plan(target, options.tables, manifest) \
                if options.tables else None
            clean_sql = tables.prelude if tables else \
                await self._clean_sql(target) if clean else ""
        except SafeholdError as exc:
            raise RestoreFailed(exc.message, database_unchanged=True, code=exc.code) from None
        load = _Load(target, key, facts, clean_sql, options, progress, tables)
        argv = ["psql", "-X", "-q", "-A", "-t", "--no-password", "-v", "ON_ERROR_STOP=1",
                "-f", "-"]
        seen: list[Blocker] = []
        async with pg_psql.watch_blockers(target, tag, progress, seen, options.terminate), \
                spawn(argv, env={**tool_env(target), "PGAPPNAME": tag},
                      secrets=target.secrets(), stdin=True, stdout=True) as child:
            markers = asyncio.ensure_future(read_markers(child, key))
            try:
                await feed_stdin(child, b"", load.script(chunks, child, markers),
                                 lambda n: None)
            except (UnsafeScript, RefusedSection) as exc:
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
            _report(load.guard, load.roles_plan, facts, options, progress)
            if tables is not None and load.guard.cut is not None:
                progress.log(f"tables restored: {tables.describe()}" + (
                    "; foreign keys put back: " + ", ".join(load.guard.cut.incoming_fks)
                    if load.guard.cut.incoming_fks else ""))
            return
        raise _psql_failed(rc, child.error_text(), target, seen, progress)


class _Load:
    """The script psql reads: Safehold's prelude (BEGIN, roles to create, the clean), the
    backup through the guard, the end marker, and COMMIT only once psql proved that
    everything before it ran inside Safehold's own transaction."""

    def __init__(self, target: TargetConfig, key: str, facts: pg_roles.RoleFacts,
                 clean_sql: str, options: RestoreOptions, progress: Progress,
                 tables: pg_tables.TablePlan | None = None) -> None:
        self.target, self.key, self.facts, self.clean_sql = target, key, facts, clean_sql
        self.options, self.progress = options, progress
        self.roles_plan = pg_globals.Plan()
        # some tables only: their sections pass, then the plan's proof runs before COMMIT
        self.postlude = (tables.postlude + "\n").encode() if tables else b""
        self.guard = PgScriptGuard(skip_privileges=options.roles == "skip",
                                   role_map=dict(options.owner_map)
                                   if options.roles == "map" else None,
                                   cut=TableCut(tables.selection) if tables else None)

    async def prelude(self, head: pg_globals.GlobalsHead | None) -> bytes:
        """psql prints `safehold-begin-KEY|<txid>` right after BEGIN and, after the whole
        script, `safehold-ready-KEY|<txid>`: the same txid proves that nothing in the
        script ended Safehold's transaction (the key is unknown to the file; the calls are
        schema-qualified so the file cannot shadow them). The clean takes every table's
        lock: it waits at most lock_timeout for the application's sessions, then fails,
        and the transaction rolls back (unchanged). Roles to create (from the backup's
        globals when it has them) come first."""
        if head is not None:
            self.roles_plan = await pg_roles.roles_plan(self.target, self.facts, head)
        return (f"\\restrict {self.key}\nBEGIN; SET LOCAL lock_timeout = "
                f"{int(self.target.lock_timeout * 1000)}; SELECT 'safehold-begin-{self.key}', "
                f"pg_catalog.txid_current(); {self.roles_plan.sql} {self.clean_sql}\n"
                ).encode()

    async def script(self, chunks: AsyncIterator[bytes], child: Child,
                     markers: asyncio.Future[tuple[bytes | None, bytes] | None]
                     ) -> AsyncIterator[bytes]:
        # roles = "create" reads the backup's globals (its head) before BEGIN
        head = pg_globals.GlobalsHead() if self.options.roles == "create" else None
        opened = False
        async for chunk in chunks:  # ends only after the stored sha256 was verified
            self.progress.add_bytes(len(chunk))
            if not opened:
                if head is not None:
                    head.feed(chunk)
                    if not head.done:
                        continue
                    chunk = bytes(head.held)
                yield await self.prelude(head)
                opened = True
            if out := self.guard.feed(chunk):
                yield out
        if not opened:
            if head is not None:
                head.finish()
            yield await self.prelude(head)
            if head is not None and (out := self.guard.feed(bytes(head.held))):
                yield out
        # everything before COMMIT must have run: psql answers the marker only then, so a
        # worker lost before this point always leaves the database unchanged
        cut = self.guard.cut
        yield self.guard.finish() + b"\n" + self.postlude + (
            b"".join(cut.deferred) if cut else b"") + (
            f"SELECT 'safehold-ready-{self.key}', "
                                     "pg_catalog.txid_current();\n").encode()
        found = await await_markers(child, markers)
        if found is None:
            return  # psql stopped on an error: end of input, no COMMIT
        if found[0] is None or found[0] != found[1]:
            raise RestoreFailed(
                "the script ended Safehold's transaction before its end (a statement the "
                "guard did not recognise as transaction control): what followed was "
                "committed statement by statement", code="unsafe_backup")
        await self.progress.enter_stage(RestoreStage.COMMITTING)
        yield b"COMMIT;\n"


def _report(guard: PgScriptGuard, roles_plan: pg_globals.Plan, facts: pg_roles.RoleFacts,
            options: RestoreOptions, progress: Progress) -> None:
    """What a committed restore tells the operator: owners and grants left out or renamed,
    roles created, subscriptions restored disabled."""
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


def _psql_failed(rc: int, stderr: str, target: TargetConfig, seen: list[Blocker],
                 progress: Progress) -> RestoreFailed:
    """psql did not end well: why, in the backup's own line numbers."""
    detail = backup_lines(stderr, PRELUDE_LINES)
    if rc == PSQL_SCRIPT_ERROR and "due to lock timeout" in detail:
        return RestoreFailed(
            f"the restore waited {target.lock_timeout:g} s for locks held by "
            f"{describe(seen) or 'other sessions'} and gave up; its transaction was "
            "rolled back. End those sessions (or restore with "
            "\"terminate_connections\": true, or raise "
            f"[targets.{target.id}] lock_timeout) and restore again",
            database_unchanged=True, code="lock_timeout")
    if rc == PSQL_SCRIPT_ERROR:
        return RestoreFailed(f"psql stopped on an SQL error and rolled back: {detail}",
                             database_unchanged=True)
    return RestoreFailed(f"psql exited with code {rc}: {detail}",
                         database_unchanged=not progress.stage_reached(RestoreStage.COMMITTING))
