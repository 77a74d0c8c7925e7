"""The MCP server of the seed ADR ("Backup Management"), on the `mcp` SDK's MCPServer.

Resources are the ADR's URIs — `resources://coolify/backups/databases/{id}` (a database's
backups) and `…/{id}/restore` (restore options and the latest restorable backups) — plus
`resources://safehold/databases` and `resources://safehold/jobs/{job_id}`. The ADR's verbs
are tools. A restore is two calls: `plan_restore` says what will happen and returns a
confirmation token bound to the caller, target and backup (5 minutes, one use);
`execute_restore(token)` runs it. Long jobs report MCP progress from the job's events.

Mounted by the API at `/mcp` (streamable HTTP, stateless): each request carries the same
bearer token as REST; tools a token's role cannot use are not listed; every call goes
through `api.operations` (role and target scope checked, audited with `client: mcp`).
`safehold mcp` bridges stdio to this endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from aiohttp import web
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings

from api.asgi import call_asgi
from api.auth import Principal, bearer_token
from api.context import Services
from api.operations import AuditInfo, Caller, Operations
from api.recovery import within
from api.roles import Role
from api.scope import check_tables, scope_params
from shared import safehold_version
from shared.errors import BadRequest, Forbidden, SafeholdError, Unauthorized
from shared.jobs import Event, Job, JobStatus

PLAN_TTL = 300  # seconds a restore confirmation token lives
WAIT_MAX = 3600.0
_principal: ContextVar[Principal | None] = ContextVar("safehold_mcp_principal", default=None)
# the HTTP request behind the call (request id, remote address), for the audit entry
_origin: ContextVar[dict[str, str | None]] = ContextVar("safehold_mcp_origin", default={})  # noqa: B039

# what a tool answers: JSON built here, never read back by this code
ToolResult = dict[str, object]

# tool -> the role it needs somewhere (listing hides the others from a token)
TOOL_ROLES = {
    "list_databases": Role.VIEWER, "list_backups": Role.VIEWER, "job_status": Role.VIEWER,
    "recovery_window": Role.VIEWER, "backup_contents": Role.VIEWER,
    "create_backup": Role.OPERATOR, "verify_backup": Role.OPERATOR,
    "plan_restore": Role.OPERATOR, "execute_restore": Role.OPERATOR,
    "cancel_job": Role.OPERATOR, "delete_backup": Role.ADMIN,
}


def job_summary(job: Job, reader: Principal) -> ToolResult:
    """The job as `reader` may see it (a restore's error text only for its operators)."""
    from api.http import for_reader

    d = for_reader(job.to_dict(), reader, job.kind, job.target)
    return {k: d.get(k) for k in ("id", "kind", "target", "status", "created_at",
                                  "started_at", "finished_at", "progress", "result", "error",
                                  "safety_backup") if d.get(k) is not None}


class TokenMiddleware:
    """Verify the request's bearer token before anything runs (an MCP request without
    a valid token gets an error, never data); hide tools the token's role cannot use."""

    def __init__(self, services: Callable[[], Services]) -> None:
        self.services = services

    async def __call__(self, ctx: ServerRequestContext[object, object],
                       call_next: CallNext) -> HandlerResult:
        request = getattr(ctx, "request", None)
        headers = getattr(request, "headers", None) or {}
        principal = await self.services().verifier.verify(
            bearer_token(headers.get("authorization")))
        token = _principal.set(principal)
        scope = getattr(request, "scope", None) or {}
        origin = _origin.set(dict((scope.get("state") or {}).get("safehold") or {}))
        try:
            result = await call_next(ctx)
        finally:
            _principal.reset(token)
            _origin.reset(origin)
        if ctx.method == "tools/list":  # the wire form: a dict with "tools"
            tools = result.get("tools") if isinstance(result, dict) else None
            if isinstance(result, dict) and isinstance(tools, list):
                result["tools"] = [t for t in tools if principal.best_role >= TOOL_ROLES.get(
                    str(t.get("name")) if isinstance(t, dict) else "", Role.ADMIN)]
        return result


class SafeholdToolError(ToolError):
    """A Safehold error as a tool error ("code: message"), keeping its HTTP status for
    resource reads (404 → ResourceNotFoundError)."""

    def __init__(self, exc: SafeholdError) -> None:
        super().__init__(f"{exc.code}: {exc.message}")
        self.status = exc.status


class _Kit:
    """What every tool needs: the caller from the request's context, one audited run,
    a job followed with progress reports."""

    def __init__(self, services: Callable[[], Services]) -> None:
        self.services = services

    def caller(self) -> tuple[Operations, Caller]:
        principal = _principal.get()
        if principal is None:
            raise Unauthorized("this needs a bearer token")
        o = _origin.get()
        return Operations(self.services()), Caller(principal, "mcp", o.get("request_id"),
                                              o.get("remote"), "POST", "/mcp")

    async def run(self, tool: str, target: str | None,
                  body: Callable[[Operations, Caller], Awaitable[ToolResult]],
                  info: AuditInfo | None = None) -> ToolResult:
        """Run a tool's operation; a read is audited here (operations audit the rest),
        with what `body` put in `info` (target, backup) by then; Safehold errors become
        tool errors with their code."""
        ops, who = self.caller()
        try:  # every call is audited once: by its operation, or here (reads, refusals)
            async with ops.audited(who, f"mcp.{tool}", target, info if info is not None
                                   else {}, unless_recorded=True):
                return await body(ops, who)
        except SafeholdError as exc:
            raise SafeholdToolError(exc) from None

    async def follow(self, ops: Operations, who: Caller, job: Job, ctx: Context,
                     wait: float) -> ToolResult:
        """Report the job's progress to the client until it ends or `wait` passes."""
        reported = [0.0]

        async def on_event(ev: Event) -> None:
            """The job's overall percent (a progress event's snapshot; never backwards),
            its phase as the message."""
            snap = ev.data.get("progress") if ev.type == "progress" else ev.data
            if ev.type not in ("progress", "phase") or not isinstance(snap, dict):
                return
            if isinstance(pct := snap.get("percent"), int | float):
                reported[0] = max(reported[0], float(pct))
            await ctx.report_progress(reported[0], 100.0, str(snap.get("phase") or ""))
        if wait > 0 and not job.terminal:
            job = await ops.wait(job.id, min(wait, WAIT_MAX), on_event)
        if job.status == JobStatus.SUCCEEDED:
            await ctx.report_progress(100.0, 100.0, JobStatus.SUCCEEDED.value)
        return job_summary(job, who.principal)


@dataclass(frozen=True)
class _Reads:
    list_databases: Callable[[], Awaitable[ToolResult]]
    list_backups: Callable[[str], Awaitable[ToolResult]]
    job_status: Callable[[str], Awaitable[ToolResult]]
    recovery_window: Callable[[str], Awaitable[ToolResult]]
    backup_contents: Callable[[str, str], Awaitable[ToolResult]]


def _read_tools(server: MCPServer, kit: _Kit) -> _Reads:
    """What a viewer may call."""
    @server.tool(description="The databases (targets) this token may see, with engine and "
                             "schedule.")
    async def list_databases() -> ToolResult:
        return await kit.run("list_databases", None,
                         lambda ops, who: _async({"databases": ops.targets(who)}))

    @server.tool(description="A database's backups, newest first: file name, kind, size, "
                             "created_at, sha256, where stored, verification.")
    async def list_backups(database_id: str) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            found, unavailable = await ops.backups(who, database_id)
            return {"database_id": database_id, "backups": [_brief(m) for m in found],
                    **({"unavailable": unavailable} if unavailable else {})}
        return await kit.run("list_backups", database_id, body)

    @server.tool(description="A job's status, progress, result or error.")
    async def job_status(job_id: str) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            return job_summary(await ops.job(who, job_id), who.principal)
        return await kit.run("job_status", None, body)

    @server.tool(description="A PITR database's recovery window: earliest and latest instant "
                             "a restore can reach, how far the archive is behind, bases, "
                             "gaps (plan_restore takes an instant of it as point_in_time).")
    async def recovery_window(database_id: str) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            return await ops.recovery_window(who, database_id)
        return await kit.run("recovery_window", database_id, body)

    @server.tool(description="What a backup holds, as recorded when it was made: its "
                             "tables (collections, key spaces) with row counts, exact where "
                             "counted as the dump passed. Reads no byte of the backup.")
    async def backup_contents(database_id: str, backup: str) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            return await ops.backup_contents(who, database_id, backup)
        return await kit.run("backup_contents", database_id, body)

    return _Reads(list_databases=list_databases, list_backups=list_backups,
                  job_status=job_status, recovery_window=recovery_window,
                  backup_contents=backup_contents)


def _job_tools(server: MCPServer, kit: _Kit) -> None:
    """Backups, deletes, cancels, drills."""
    @server.tool(description="Start a backup of a database; waits up to wait_seconds "
                             "(default 600) reporting progress, then returns the job.")
    async def create_backup(database_id: str, ctx: Context, note: str = "",
                            wait_seconds: float = 600) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            job = await ops.start_backup(who, database_id, note=note)
            return await kit.follow(ops, who, job, ctx, wait_seconds)
        return await kit.run("create_backup", database_id, body)

    @server.tool(description="Delete one backup everywhere it is stored (admin).")
    async def delete_backup(database_id: str, backup: str) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            return {"deleted": await ops.delete_backup(who, database_id, backup),
                    "database_id": database_id}
        return await kit.run("delete_backup", database_id, body)

    @server.tool(description="Cancel a queued or running job (a restore that is already "
                             "changing the database cannot be cancelled).")
    async def cancel_job(job_id: str) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            return job_summary(await ops.cancel(who, job_id), who.principal)
        return await kit.run("cancel_job", None, body)

    @server.tool(description="Restore drill: restore the newest (or the given) backup into a "
                             "scratch place, compare exact counts, drop it; waits up to "
                             "wait_seconds reporting progress.")
    async def verify_backup(database_id: str, ctx: Context, backup: str = "",
                            wait_seconds: float = 600) -> ToolResult:
        async def body(ops: Operations, who: Caller) -> ToolResult:
            job = await ops.start_verify(who, database_id, backup or None)
            return await kit.follow(ops, who, job, ctx, wait_seconds)
        return await kit.run("verify_backup", database_id, body)


def _restore_tools(server: MCPServer, kit: _Kit) -> None:
    """A restore in two steps: plan, then execute with the plan's token."""
    @server.tool(description="Step 1 of a restore: what will happen (target, backup, its age "
                             "and size, the safety backup taken first) and a confirmation "
                             "token for execute_restore, valid 5 minutes, once. Name a "
                             "backup, or (PITR databases) a point_in_time: an RFC 3339 "
                             "instant of the recovery window, or \"latest\" (MySQL: also a "
                             "binlog position binlog.000042:1234, up to the event there, or "
                             "a MariaDB GTID gtid:0-1-42, through that transaction). "
                             "into_database: "
                             "restore beside the live database, into a new one of that name "
                             "(Redis: another database index; the live one is not touched; "
                             "replace: over it if it exists). "
                             "schemas (PostgreSQL): every table of these schemas. "
                             "tables: only these tables (PostgreSQL schema.table); every "
                             "other table is left exactly as it is (MySQL, SQLite: table; "
                             "MongoDB: db.collection; Redis: keys, glob patterns). "
                             "into_target: into "
                             "another database of the same engine (prod -> staging; a "
                             "point_in_time too: prod as it was then).")
    async def plan_restore(database_id: str, backup: str = "", point_in_time: str = "",
                           create_safety_backup: bool = True,
                           terminate_connections: bool = False,
                           roles: str | None = None,
                           owner_map: dict[str, str] | None = None,
                           database: str | None = None, into_database: str | None = None,
                           replace: bool = False, tables: list[str] | None = None,
                           into_target: str | None = None,
                           keys: list[str] | None = None,
                           schemas: list[str] | None = None) -> ToolResult:
        info: AuditInfo = {"backup": (backup or f"point in time {point_in_time}")[:200]}

        async def body(ops: Operations, who: Caller) -> ToolResult:
            target = ops.target(who, database_id, Role.OPERATOR)
            if bool(backup) == bool(point_in_time):
                raise BadRequest("name either backup or point_in_time", code="invalid_body")
            dest = ops.destination(who, target, into_target)
            scope = scope_params(kit.services().settings, target, into_database, replace,
                                 tables, dest, keys, schemas)
            where = (f"the new database {into_database} beside {target.id} (which is not "
                     "touched)" + (", replacing it if it exists," if replace else "")
                     if into_database else dest.id)
            if dest.id != target.id:
                where = f"target {dest.id} (a copy of {target.id}'s " + (
                    f"state at {point_in_time}" if point_in_time else "backup") + \
                    f"; {target.id} is not touched)"
            if schemas and point_in_time:
                raise BadRequest("schemas take a backup, not a point_in_time",
                                 code="invalid_body")
            if tables or keys or schemas:
                what = " and ".join(
                    ([f"the tables of schema(s) {', '.join(schemas)}"] if schemas else [])
                    + ([f"table(s) {', '.join(tables)}"] if tables else [])
                    + ([f"the keys matching {', '.join(keys)}"] if keys else []))
                where = (f"{what} of {where} (everything else is left as it is)")
            if point_in_time:
                return await _plan_point_in_time(kit, ops, who, target.id, point_in_time,
                                                 create_safety_backup, terminate_connections,
                                                 dict(scope), where)
            if roles not in (None, "create", "skip", "map") or (roles == "map") != bool(
                    owner_map):
                raise BadRequest("roles must be \"create\", \"skip\" or \"map\" (with "
                                 "owner_map)", code="invalid_body")
            name, manifest = await ops.manifest(target.id, backup)
            check_tables(scope, manifest)
            if manifest.get("engine") != target.engine:
                raise BadRequest(f"{name.filename} is a {manifest.get('engine')} backup; "
                                 f"{target.id} is {target.engine}", code="engine_mismatch")
            token = secrets.token_urlsafe(24)
            plan = {"target": target.id, "backup": name.filename,
                    "sha256": manifest.get("sha256"), "subject": who.principal.subject,
                    "session": who.principal.session,
                    "create_safety_backup": create_safety_backup,
                    "terminate_connections": terminate_connections, "roles": roles,
                    "owner_map": owner_map, "database": database,
                    "into_target": into_target, **scope}
            s = kit.services()
            await s.redis.set(_plan_key(s, token), json.dumps(plan), ex=PLAN_TTL)
            return {
                "database_id": target.id, "engine": target.engine, "backup": name.filename,
                "created_at": manifest.get("created_at"),
                "size_bytes": manifest.get("size_bytes"), "sha256": manifest.get("sha256"),
                "verification": verification.get("outcome")
                if isinstance(verification := manifest.get("verification"), dict) else None,
                "what_happens": (
                    ("a safety backup of the current database is taken first; then "
                     if create_safety_backup else "NO safety backup is taken; ")
                    + f"{where} is replaced by the content of {name.filename} (the backup "
                    "is verified before anything is dropped; a failed restore rolls back)"),
                "confirmation_token": token, "expires_in_seconds": PLAN_TTL}
        return await kit.run("plan_restore", database_id, body, info)

    @server.tool(description="Step 2 of a restore: run the plan a confirmation token names; "
                             "waits up to wait_seconds reporting progress.")
    async def execute_restore(confirmation_token: str, ctx: Context,
                              wait_seconds: float = 1800) -> ToolResult:
        info: AuditInfo = {}

        async def body(ops: Operations, who: Caller) -> ToolResult:
            s = kit.services()
            key = _plan_key(s, confirmation_token)
            raw = await s.redis.get(key)
            plan = json.loads(raw) if raw is not None else None
            if plan is not None:  # a refusal below still names what was planned
                info["target"], info["backup"] = plan["target"], plan["backup"]
            if plan is not None and (plan["subject"], plan.get("session")) != (
                    who.principal.subject, who.principal.session):
                raise Forbidden("the token was issued to another caller",
                                code="invalid_confirmation")
            if plan is None or not await s.redis.delete(key):  # one use, even when racing
                raise BadRequest("the token is unknown, used or expired (plan_restore gives "
                                 "a new one)", code="invalid_confirmation")
            if plan.get("point_in_time"):
                job = await ops.start_pitr_restore(
                    who, plan["target"], plan["point_in_time"],
                    safety=plan["create_safety_backup"],
                    terminate=bool(plan.get("terminate_connections")),
                    into_database=plan.get("into_database"),
                    replace=bool(plan.get("replace")), tables=plan.get("tables"),
                    into_target=plan.get("into_target"))
                return await kit.follow(ops, who, job, ctx, wait_seconds)
            job = await ops.start_restore(who, plan["target"], plan["backup"],
                                          safety=plan["create_safety_backup"],
                                          terminate=bool(plan.get("terminate_connections")),
                                          roles=plan.get("roles"),
                                          owner_map=plan.get("owner_map"),
                                          database=plan.get("database"),
                                          into_database=plan.get("into_database"),
                                          replace=bool(plan.get("replace")),
                                          tables=plan.get("tables"),
                                          into_target=plan.get("into_target"),
                                          keys=plan.get("keys"),
                                          schemas=plan.get("schemas"),
                                          expect_sha256=plan["sha256"])
            return await kit.follow(ops, who, job, ctx, wait_seconds)
        return await kit.run("execute_restore", None, body, info)


async def _plan_point_in_time(kit: _Kit, ops: Operations, who: Caller, target: str,
                              point_in_time: str, safety: bool, terminate: bool,
                              scope: dict[str, object], where: str) -> ToolResult:
    """A restore to an instant: checked against the window now (and again when it runs)."""
    window = await ops.recovery_window(who, target)
    point_in_time = within(window, point_in_time) or "latest"
    earliest, latest = window.get("earliest"), window.get("latest")
    token = secrets.token_urlsafe(24)
    plan = {"target": target, "backup": f"point in time {point_in_time}",
            "point_in_time": point_in_time, "subject": who.principal.subject,
            "session": who.principal.session, "create_safety_backup": safety,
            "terminate_connections": terminate, **scope}
    s = kit.services()
    await s.redis.set(_plan_key(s, token), json.dumps(plan), ex=PLAN_TTL)
    return {"database_id": target, "point_in_time": point_in_time,
            "window": {"earliest": earliest, "latest": latest},
            "what_happens": (
                ("a safety backup of the current database is taken first; then "
                 if safety else "NO safety backup is taken; ")
                + f"{where} is replaced by its state at {point_in_time}, recovered from the "
                "archive in a scratch server (verified before anything is dropped; a failed "
                "restore rolls back)"),
            "confirmation_token": token, "expires_in_seconds": PLAN_TTL}


def _resources(server: MCPServer, reads: _Reads) -> None:
    """The read tools as resources (and the Coolify ADR's URIs)."""
    @server.resource("resources://safehold/databases", mime_type="application/json",
                     description="The databases this token may see")
    async def databases_resource() -> str:
        return await read(reads.list_databases())

    @server.resource("resources://coolify/backups/databases/{id}",
                     mime_type="application/json",
                     description="A database's backups with metadata, newest first")
    async def backups_resource(id: str) -> str:  # noqa: A002 - the ADR's parameter name
        return await read(reads.list_backups(id))

    @server.resource("resources://coolify/backups/databases/{id}/restore",
                     mime_type="application/json",
                     description="Restore options and the latest restorable backups")
    async def restore_resource(id: str) -> str:  # noqa: A002
        listing = json.loads(await read(reads.list_backups(id)))
        restorable = [b for b in listing["backups"]
                      if b.get("kind") != "safety_backup" and not b.get("damaged")][:10]
        return json.dumps({
            "database_id": id,
            "options": {"create_safety_backup": {"type": "boolean", "default": True,
                                                 "description": "take a backup of the "
                                                 "current database first"}},
            "how": "plan_restore(database_id, backup) → execute_restore(confirmation_token)",
            "latest_restorable_backups": restorable})

    @server.resource("resources://safehold/databases/{id}/recovery-window",
                     mime_type="application/json",
                     description="A PITR database's recovery window")
    async def window_resource(id: str) -> str:  # noqa: A002
        return await read(reads.recovery_window(id))

    @server.resource("resources://safehold/databases/{id}/backups/{backup}/contents",
                     mime_type="application/json",
                     description="What a backup holds (tables and counts at backup time)")
    async def contents_resource(id: str, backup: str) -> str:  # noqa: A002
        return await read(reads.backup_contents(id, backup))

    @server.resource("resources://safehold/jobs/{job_id}", mime_type="application/json",
                     description="One job: status, progress, result or error")
    async def job_resource(job_id: str) -> str:
        return await read(reads.job_status(job_id))


def build_mcp(services: Callable[[], Services]) -> MCPServer:
    server: MCPServer = MCPServer(
        name="safehold", title="Safehold backups", version=safehold_version(),
        instructions="Back up and restore databases. Every operation is a job; restores "
                     "need plan_restore then execute_restore with its token.",
        middleware=[TokenMiddleware(services)])
    kit = _Kit(services)
    reads = _read_tools(server, kit)
    _job_tools(server, kit)
    _restore_tools(server, kit)
    _resources(server, reads)
    return server


async def read(answer: Awaitable[ToolResult]) -> str:
    """A resource's JSON; a refusal (scope, role, unknown id) is a clean resource error
    with its code and message, not a crash with a traceback."""
    try:
        return json.dumps(await answer)
    except ToolError as exc:
        if isinstance(exc, SafeholdToolError) and exc.status == 404:
            raise ResourceNotFoundError(str(exc)) from None
        raise ResourceError(str(exc)) from None


async def _async(value: ToolResult) -> ToolResult:
    return value


def _brief(m: Mapping[str, object]) -> ToolResult:
    keys = ("filename", "kind", "created_at", "size_bytes", "size_mib", "sha256", "engine",
            "stored_on", "encrypted", "compressed", "partial", "note", "verified_at",
            "damaged", "damaged_on")
    out = {k: m.get(k) for k in keys if m.get(k) is not None}
    if isinstance(verification := m.get("verification"), dict):
        out["verification"] = verification.get("outcome")
    return out


def _plan_key(s: Services, token: str) -> str:
    return f"{s.keys.prefix}:mcp:plan:{hashlib.sha256(token.encode()).hexdigest()}"



# ---------------------------------------------------------------------- mounting
MCP_MANAGER = web.AppKey("mcp_manager", StreamableHTTPSessionManager)


async def mcp_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the SDK's session manager for the app's lifetime, in a task of its own (its
    anyio task group must be entered and left by one task; aiohttp's start-up and
    clean-up may run in two)."""
    from api.context import SERVICES

    server = build_mcp(lambda: app[SERVICES])
    server.streamable_http_app(
        stateless_http=True,
        # bearer tokens, never cookies: a rebinding page cannot act as anyone
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    manager = server.session_manager
    started, stop = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with manager.run():
            started.set()
            await stop.wait()

    task = asyncio.create_task(hold())
    await started.wait()
    app[MCP_MANAGER] = manager
    yield
    stop.set()
    await task


async def mcp_endpoint(request: web.Request) -> web.StreamResponse:
    """POST/GET/DELETE /mcp: the streamable HTTP transport (through the ASGI bridge)."""
    from api.context import REQUEST_ID

    manager = request.app[MCP_MANAGER]
    return await call_asgi(manager.handle_request, request, state={"safehold": {
        "request_id": request.get(REQUEST_ID), "remote": request.remote}})
