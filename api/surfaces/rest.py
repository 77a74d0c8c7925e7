"""The REST v1 surface: health, targets, backups, restores, jobs, audit, prune, drills,
schedules, destinations. Each view reads its request with api.http and acts through
api.operations."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from api.context import PRINCIPAL
from api.files import send_stream
from api.http import (
    EVENT_ID_RE,
    JOB_ID_RE,
    caller,
    cursor,
    idempotency_key,
    job_response,
    job_view,
    live_workers,
    ops,
    principal_of,
    query_bool,
    query_float,
    read_json,
    svc,
    wait_param,
)
from api.roles import Role
from shared import codecs
from shared.config import TARGET_ID_RE
from shared.errors import BadRequest, NotFound, SafeholdError, Unavailable, Unprocessable
from shared.jobs import JobKind, JobStatus

STATS_WAIT = 60.0
DRY_RUN_WAIT = 30.0  # seconds a prune's dry run is waited for: its answer is the plan


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
    job = await ops(request).submit(caller(request), JobKind.STATS, target, {}, {},
                                    wait=STATS_WAIT)
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
    body = await read_json(request)
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


async def recovery_window(request: web.Request) -> web.Response:
    """The target's point-in-time recovery window (PITR targets)."""
    return web.json_response(await ops(request).recovery_window(
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
    store, name, manifest = await ops(request).download_source(caller(request), target, file)
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


async def backup_contents(request: web.Request) -> web.Response:
    return web.json_response(await ops(request).backup_contents(
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
    body = await read_json(request)
    if ("backup" in body) == ("point_in_time" in body):
        raise BadRequest("field 'backup' is required (or, on a point-in-time target, "
                         "'point_in_time' instead): name one of them", code="invalid_body")
    if "point_in_time" in body:
        if any(k in body for k in ("roles", "owner_map", "database", "schemas")):
            raise Unprocessable("roles, owner_map, database and schemas apply to a backup's "
                                "restore, not (yet) to a point in time", code="invalid_body")
        job = await ops(request).start_pitr_restore(
            caller(request), request.match_info["target"], body["point_in_time"],
            safety=body.get("create_safety_backup", True), identity=body.get("identity"),
            terminate=body.get("terminate_connections", False),
            into_database=body.get("into_database"), replace=body.get("replace", False),
            tables=body.get("tables"), into_target=body.get("into_target"),
            idempotency_key=idempotency_key(request), wait=wait_param(request))
        return job_response(job, request)
    job = await ops(request).start_restore(
        caller(request), request.match_info["target"], body["backup"],
        safety=body.get("create_safety_backup", True), identity=body.get("identity"),
        terminate=body.get("terminate_connections", False), roles=body.get("roles"),
        owner_map=body.get("owner_map"), database=body.get("database"),
        into_database=body.get("into_database"), replace=body.get("replace", False),
        tables=body.get("tables"), into_target=body.get("into_target"), keys=body.get("keys"),
        schemas=body.get("schemas"), idempotency_key=idempotency_key(request),
        wait=wait_param(request))
    return job_response(job, request)


# ---------------------------------------------------------------------- jobs
async def list_jobs(request: web.Request) -> web.Response:
    q = request.query
    status, kind = q.get("status"), q.get("kind")
    if status and status not in set(JobStatus):
        raise BadRequest(f"unknown status '{status}'", code="invalid_query")
    if kind and kind not in set(JobKind):
        raise BadRequest(f"unknown kind '{kind}'", code="invalid_query")
    if "target" in q and not TARGET_ID_RE.match(q["target"]):
        raise BadRequest("query parameter 'target' is not a target id", code="invalid_query")
    limit = int(query_float(request, "limit", 1, 1000) or 100)
    jobs = await ops(request).jobs(
        caller(request), target=q.get("target"), status=status, kind=kind, limit=limit,
        before=cursor(request, JOB_ID_RE, "a job id"))
    p = principal_of(request)
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
    entries = await ops(request).audit_entries(
        caller(request), limit=limit,
        before=cursor(request, EVENT_ID_RE, "an audit entry id (its `id`)"),
        **{k: q.get(k) for k in ("subject", "target", "action", "result", "job", "via",
                                 "since")})
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
    body = await read_json(request)
    job = await ops(request).start_verify(
        caller(request), request.match_info["target"], body.get("backup"),
        point_in_time=body.get("point_in_time"),
        identity=body.get("identity"), idempotency_key=idempotency_key(request),
        wait=wait_param(request))
    return job_response(job, request)


async def schedules_view(request: web.Request) -> web.Response:
    """Each visible target's schedule: next run, last slot and job, its outcome."""
    return web.json_response({"schedules": await ops(request).schedules(caller(request))})


async def destinations(request: web.Request) -> web.Response:
    """Destinations' health (a token admin of some targets only sees those)."""
    return web.json_response({"destinations": await ops(request).destinations(
        caller(request))})


async def jwks(request: web.Request) -> web.Response:
    """The dev-mode signing key's public half (tokens from `safehold token`)."""
    doc = svc(request).dev_jwks
    if doc is None:
        raise NotFound("no local signing key: tokens come from the configured issuer")
    return web.json_response(doc)
