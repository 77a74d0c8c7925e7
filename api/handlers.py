"""REST v1 handlers: targets, backups, restores, jobs, health."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web

from api.auth import Principal, require
from api.context import PRINCIPAL, REQUEST_ID, SERVICES, Services
from api.files import send_stream
from api.operations import MAX_WAIT, Caller, Operations
from api.roles import Role
from api.schemas import JOB_ID
from shared import CLI_AGENT, codecs, naming
from shared.config import TARGET_ID_RE
from shared.errors import BadRequest, NotFound, SafeholdError, Unavailable
from shared.jobs import Job, JobKind, JobStatus

CALLER = web.RequestKey("caller", Caller)
STATS_WAIT = 60.0


def svc(request: web.Request) -> Services:
    return request.app[SERVICES]


def job_view(job: Job, reader: Principal | None = None) -> dict[str, Any]:
    d = for_reader(job.to_dict(), reader, job.kind, job.target)
    d["links"] = {"self": f"/api/v1/jobs/{job.id}", "events": f"/api/v1/jobs/{job.id}/events"}
    return d


_QUOTED_PATH = re.compile(r"""(['"])/[^'"\n]*\1""")


def hide_paths(text: str) -> str:
    """Server file paths (as OSError quotes them) out of what non-admins read."""
    return _QUOTED_PATH.sub(r"\1<server path>\1", text)


def for_reader(doc: dict[str, Any], reader: Principal | None, kind: str,
               target: str) -> dict[str, Any]:
    """A restore's error quotes what the restored file made the database say (user SQL can
    echo anything it reads): only operators and admins of the target see that text. Below
    admin, server file paths in any job's error are hidden."""
    if reader is not None and kind == JobKind.STATS and reader.role_for(target) < Role.ADMIN and \
            isinstance(doc.get("result"), dict) and "path" in doc["result"]:
        doc = {**doc, "result": {k: v for k, v in doc["result"].items() if k != "path"}}
    error = doc.get("error")
    if reader is not None and isinstance(error, dict) and \
            reader.role_for(target) < Role.ADMIN and isinstance(error.get("message"), str):
        error = {**error, "message": hide_paths(error["message"])}
        doc = {**doc, "error": error}
    if (reader is None or kind != JobKind.RESTORE or not isinstance(error, dict)
            or reader.role_for(target) >= Role.OPERATOR):
        return doc
    shown = {k: v for k, v in error.items() if k != "message"}
    shown["message"] = (f"the restore failed ({error.get('code')}); database "
                        f"{error.get('database_state', 'unknown')}. The details are shown to "
                        "operators and admins of this target")
    return {**doc, "error": shown}


def principal(request: web.Request) -> dict[str, Any]:
    p = request.get(PRINCIPAL)
    return p.to_dict() if p is not None else {"subject": "anonymous"}


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


async def json_body(request: web.Request) -> Any:
    """The request's JSON (400 for anything else, a 100,000-deep nesting included)."""
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None


async def read_json(request: web.Request, allowed: dict[str, type | tuple[type, ...]]
                    ) -> dict[str, Any]:
    """A JSON object body (or no body at all) with only `allowed` keys of the given types."""
    if not request.can_read_body:
        return {}
    body = await json_body(request)
    if not isinstance(body, dict):  # `null` too: a body, when sent, is an object
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    unknown = set(body) - set(allowed)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}",
                         code="invalid_body")
    for key, typ in allowed.items():
        if key in body and not isinstance(body[key], typ):
            raise BadRequest(f"field '{key}' has the wrong type", code="invalid_body")
    return body


def query_float(request: web.Request, name: str, lo: float, hi: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter '{name}' must be a number", code="invalid_query") \
            from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter '{name}' must be between {lo:g} and {hi:g}",
                         code="invalid_query")
    return value


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"query parameter '{name}' must be true or false", code="invalid_query")


WEB_CLIENT = "web"  # the page's X-Safehold-Client header


def rest_surface(request: web.Request) -> str:
    """Which surface a request came through, for the audit's "via" (informational: who
    acted is the token's subject): MCP, the seed surface, the CLI, the web page, or any
    other HTTP client (curl, a script)."""
    if request.path == "/mcp":
        return "mcp"
    if request.path.startswith("/backup/"):
        return "seed"
    if request.headers.get("User-Agent", "").startswith(CLI_AGENT):
        return "cli"
    if request.headers.get("X-Safehold-Client") == WEB_CLIENT:
        return "web"
    return "rest"


def caller(request: web.Request, surface: str = "rest") -> Caller:
    """This request as an operations caller (one per request: it carries the audit mark
    and the warnings the answer shows)."""
    c = request.get(CALLER)
    if c is None:
        if surface == "rest":
            surface = rest_surface(request)
        c = Caller(request[PRINCIPAL], surface, request.get(REQUEST_ID), request.remote,
                   request.method, request.path)
        request[CALLER] = c
    return c


def ops(request: web.Request) -> Operations:
    return Operations(svc(request))


MAX_IDEMPOTENCY_KEY = 200


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters",
                         code="invalid_header")
    return key


DRY_RUN_WAIT = 30.0  # seconds a prune's dry run is waited for: its answer is the plan


def wait_param(request: web.Request) -> float | None:
    return query_float(request, "wait", 0, MAX_WAIT)


def job_response(job: Job, request: web.Request | None = None) -> web.Response:
    view = job_view(job, request.get(PRINCIPAL) if request is not None else None)
    c = request.get(CALLER) if request is not None else None
    if c is not None and c.warnings and not job.terminal:
        view["warnings"] = list(c.warnings)
    return web.json_response(view, status=200 if job.terminal else 202,
                             headers={"Location": f"/api/v1/jobs/{job.id}"})


async def live_workers(s: Services) -> int:
    return await Operations(s).live_workers()


# ---------------------------------------------------------------------- health
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    s = svc(request)
    checks: dict[str, Any] = {}
    try:
        await asyncio.wait_for(s.redis.ping(), 2)
        checks["redis"] = "ok"
        checks["workers"] = await live_workers(s)
    except (TimeoutError, OSError, ConnectionError) as exc:
        checks["redis"] = f"unreachable ({type(exc).__name__})"
        checks["workers"] = None
    ready = checks["redis"] == "ok" and bool(checks["workers"])
    if not ready:
        reason = ("Redis is unreachable" if checks["redis"] != "ok"
                  else "no live worker (start one with `safehold worker`)")
        return web.json_response({"status": "not_ready", "checks": checks,
                                  "error": {"code": "not_ready", "message": reason}},
                                 status=503)
    return web.json_response({"status": "ready", "checks": checks})


# ---------------------------------------------------------------------- targets
async def list_targets(request: web.Request) -> web.Response:
    s = svc(request)
    visible = principal_of(request).targets_visible(list(s.settings.targets))
    return web.json_response({
        "default_target": s.settings.default_target,
        "targets": [s.settings.targets[t].public() for t in visible],
    })


async def stats_of(request: web.Request, target: str) -> web.Response:
    """Stats run on a worker (the engines live there) as a short job we wait for."""
    s = svc(request)
    if not await live_workers(s):
        raise Unavailable("no worker is running to query the database; start one with "
                          "`safehold worker`", code="no_worker")
    job = await ops(request).submit(caller(request), "stats", target, {}, {}, wait=STATS_WAIT)
    if job.status == JobStatus.SUCCEEDED:
        result = dict(job.result or {})
        if request[PRINCIPAL].role_for(target) < Role.ADMIN:
            result.pop("path", None)  # where the file lives on the server: admins only
        return web.json_response(result)
    if job.status == JobStatus.FAILED and job.error:
        raise SafeholdError(job.error.get("message", "stats failed"),
                            code=job.error.get("code", "stats_failed"))
    return job_response(job, request)


async def target_stats(request: web.Request) -> web.Response:
    return await stats_of(request, svc(request).settings.target(request.match_info["target"]).id)


# ---------------------------------------------------------------------- backups
async def create_backup(request: web.Request) -> web.Response:
    body = await read_json(request, {"compress": bool, "note": str, "format": str,
                                     "use_apoc": bool})
    job = await ops(request).start_backup(
        caller(request), request.match_info["target"], compress=body.get("compress"),
        note=body.get("note", ""), fmt=body.get("format"),
        use_apoc=bool(body.get("use_apoc")), idempotency_key=idempotency_key(request),
        wait=wait_param(request))
    return job_response(job, request)


async def retention_preview(request: web.Request) -> web.Response:
    """What the retention policy would delete next (a plan, nothing deleted)."""
    return web.json_response(await ops(request).retention_preview(
        caller(request), request.match_info["target"]))


async def list_backups(request: web.Request) -> web.Response:
    target = svc(request).settings.target(request.match_info["target"]).id
    backups, unavailable = await ops(request).backups(caller(request), target)
    return web.json_response({"target": target, "total_count": len(backups),
                              "backups": backups,
                              **({"unavailable": unavailable} if unavailable else {})})


async def download(request: web.Request, target: str, file: str) -> web.StreamResponse:
    """Stream a backup from the first destination holding it (`X-Safehold-Destination`
    says which), with Range; or redirect to a presigned URL where the destination is an
    S3 bucket configured with `download = "redirect"`."""
    name = naming.parse(file)
    copies = await svc(request).catalog.copies(target, name)
    store, manifest = copies[0]
    if store.config.download == "redirect" and request.method == "GET":
        url = await store.presigned_url(target, name.filename, store.config.presign_ttl)
        if url:
            raise web.HTTPTemporaryRedirect(url, headers={
                "X-Safehold-Destination": store.name, "Cache-Control": "no-store"})
    size = await store.size(target, name.filename)
    return await send_stream(
        request, lambda start, end: store.open(target, name.filename, start, end),
        size=size, filename=name.filename, sha256=str(manifest.get("sha256", "")),
        content_type=codecs.content_type(codecs.chain_of(manifest)),
        extra_headers={"X-Safehold-Destination": store.name})


async def get_backup(request: web.Request) -> web.Response:
    return web.json_response(await ops(request).backup(
        caller(request), request.match_info["target"], request.match_info["file"]))


async def download_backup(request: web.Request) -> web.StreamResponse:
    target = svc(request).settings.target(request.match_info["target"]).id
    return await download(request, target, request.match_info["file"])


async def delete_backup(request: web.Request) -> web.Response:
    target = svc(request).settings.target(request.match_info["target"]).id
    deleted = await ops(request).delete_backup(caller(request), target,
                                               request.match_info["file"])
    return web.json_response({"deleted": deleted, "target": target})


# ---------------------------------------------------------------------- restores
async def create_restore(request: web.Request) -> web.Response:
    body = await read_json(request, {"backup": str, "create_safety_backup": bool,
                                     "identity": str, "terminate_connections": bool,
                                     "roles": str, "owner_map": dict, "database": str})
    if "backup" not in body:
        raise BadRequest("field 'backup' (a backup file name) is required", code="invalid_body")
    job = await ops(request).start_restore(
        caller(request), request.match_info["target"], body["backup"],
        safety=body.get("create_safety_backup", True), identity=body.get("identity"),
        terminate=body.get("terminate_connections", False), roles=body.get("roles"),
        owner_map=body.get("owner_map"), database=body.get("database"),
        idempotency_key=idempotency_key(request), wait=wait_param(request))
    return job_response(job, request)


# ---------------------------------------------------------------------- jobs
JOB_ID_RE = re.compile(JOB_ID["pattern"])
AUDIT_ID_RE = re.compile(r"^[0-9]{1,19}-[0-9]{1,19}$")


def cursor(request: web.Request, grammar: re.Pattern[str], what: str) -> str | None:
    """A paging cursor (`before`) from the query, in its grammar, else 400."""
    value = request.query.get("before")
    if value is not None and not grammar.fullmatch(value):
        raise BadRequest(f"query parameter 'before' must be {what} (the previous page's "
                         "next_before)", code="invalid_query")
    return value


async def list_jobs(request: web.Request) -> web.Response:
    s = svc(request)
    q = request.query
    status, kind = q.get("status"), q.get("kind")
    if status and status not in set(JobStatus):
        raise BadRequest(f"unknown status '{status}'", code="invalid_query")
    if kind and kind not in set(JobKind):
        raise BadRequest(f"unknown kind '{kind}'", code="invalid_query")
    limit = int(query_float(request, "limit", 1, 1000) or 100)
    p = principal_of(request)
    if "target" in q:
        if not TARGET_ID_RE.match(q["target"]):
            raise BadRequest("query parameter 'target' is not a target id", code="invalid_query")
        require(p, Role.VIEWER, q["target"])
    visible = set(p.targets_visible(list(s.settings.targets)))
    jobs = await s.store.list_jobs(target=q.get("target"), status=status, kind=kind,
                                   limit=limit, targets=visible,
                                   before=cursor(request, JOB_ID_RE, "a job id"))
    page: dict[str, Any] = {"jobs": [job_view(j, p) for j in jobs], "count": len(jobs)}
    if len(jobs) == limit:  # maybe more: the next page starts after the last one
        page["next_before"] = jobs[-1].id
    return web.json_response(page)


async def get_job(request: web.Request) -> web.Response:
    job = await ops(request).job(caller(request), request.match_info["job_id"])
    return web.json_response(job_view(job, principal_of(request)))


async def cancel_job(request: web.Request) -> web.Response:
    job = await ops(request).cancel(caller(request), request.match_info["job_id"])
    return web.json_response(job_view(job, principal_of(request)),
                             status=200 if job.terminal else 202)


async def audit(request: web.Request) -> web.Response:
    q = request.query
    limit = int(query_float(request, "limit", 1, 1000) or 100)
    p = principal_of(request)
    everything = p.global_role >= Role.ADMIN and p.restricted_to is None
    targets = None if everything else {
        t for t in svc(request).settings.targets if p.role_for(t) >= Role.ADMIN}
    entries = await svc(request).audit.query(
        limit=limit, targets=targets, subject=q.get("subject"), target=q.get("target"),
        action=q.get("action"), result=q.get("result"), job=q.get("job"),
        via=q.get("via"), since=q.get("since"),
        before=cursor(request, AUDIT_ID_RE, "an audit entry id (its `id`)"))
    page: dict[str, Any] = {"entries": entries, "count": len(entries)}
    if len(entries) == limit:
        page["next_before"] = entries[-1]["id"]
    return web.json_response(page)


async def prune(request: web.Request) -> web.Response:
    """Apply the target's retention policy now (a prune job); `dry_run=true` plans only,
    and answers with the plan (it waits up to DRY_RUN_WAIT unless `wait` says otherwise)."""
    dry_run = query_bool(request, "dry_run", False)
    wait = wait_param(request)
    if dry_run and "wait" not in request.query:
        wait = DRY_RUN_WAIT
    job = await ops(request).start_prune(
        caller(request), request.match_info["target"], dry_run=dry_run,
        idempotency_key=idempotency_key(request), wait=wait)
    return job_response(job, request)


async def verify(request: web.Request) -> web.Response:
    """A restore drill of the newest (or the given) backup into a scratch place."""
    body = await read_json(request, {"backup": str, "identity": str})
    job = await ops(request).start_verify(
        caller(request), request.match_info["target"], body.get("backup"),
        identity=body.get("identity"), idempotency_key=idempotency_key(request),
        wait=wait_param(request))
    return job_response(job, request)


async def schedules_view(request: web.Request) -> web.Response:
    """Each visible target's schedule: next run, last slot and job, its outcome."""
    from datetime import UTC, datetime

    from shared import schedules

    s = svc(request)
    p = principal_of(request)
    now = datetime.now(UTC)
    out = []
    for tid in p.targets_visible(list(s.settings.targets)):
        t = s.settings.targets[tid]
        state = {k.decode(): v.decode() for k, v in
                 (await s.redis.hgetall(s.keys.schedule(tid))).items()}  # type: ignore[misc]
        entry: dict[str, Any] = {
            "target": tid, "schedule": t.schedule or None, "timezone": t.timezone,
            "catch_up": t.catch_up, "retention": t.retention.public(),
            "next_run": None, "last_slot": state.get("last_slot"),
            "last_job": state.get("last_job"), "last_status": None,
            "missed_since": state.get("missed_alerted")}  # a missed-schedule alert is open
        if t.schedule:
            tz = schedules.zone(t.timezone, "timezone")
            entry["next_run"] = schedules.next_due(
                t.schedule, tz, now, schedules.jitter(tid, t.schedule_jitter)).isoformat()
        if entry["last_job"] and (job := await s.store.find(entry["last_job"])):
            entry["last_status"] = job.status
            entry["last_error"] = (job.error or {}).get("code")
        out.append(entry)
    return web.json_response({"schedules": out})


async def destinations(request: web.Request) -> web.Response:
    """Destinations' health; a token that is admin of some targets only sees those targets
    (names, counts and bytes of the others stay hidden)."""
    p = principal_of(request)
    health = await svc(request).catalog.health()
    if not (p.global_role >= Role.ADMIN and p.restricted_to is None):
        mine = {t for t in svc(request).settings.targets if p.role_for(t) >= Role.ADMIN}
        for d in health:
            d["targets"] = [t for t in d.get("targets") or [] if t in mine]
            for key in ("backups", "bytes"):  # totals over targets it may not see
                if key in d:
                    d[key] = None
    return web.json_response({"destinations": health})


async def jwks(request: web.Request) -> web.Response:
    """The dev-mode signing key's public half (tokens from `safehold token`)."""
    doc = svc(request).dev_jwks
    if doc is None:
        raise NotFound("no local signing key: tokens come from the configured issuer")
    return web.json_response(doc)
