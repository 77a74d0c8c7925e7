"""REST v1 handlers: targets, backups, restores, jobs, health."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from api.auth import Principal, require
from api.context import AUDIT_INFO, PRINCIPAL, SERVICES, Services
from api.files import send_stream
from api.roles import Role
from shared import codecs, naming, stats
from shared.config import TargetConfig
from shared.errors import BadRequest, Conflict, NotFound, SafeholdError, Unavailable
from shared.jobs import TERMINAL, Job
from shared.naming import ENGINE_FORMATS
from shared.queue import enqueue

MAX_WAIT = 3600.0
STATS_WAIT = 60.0


def svc(request: web.Request) -> Services:
    return request.app[SERVICES]


def job_view(job: Job, reader: Principal | None = None) -> dict[str, Any]:
    d = for_reader(job.to_dict(), reader, job.kind, job.target)
    d["links"] = {"self": f"/api/v1/jobs/{job.id}", "events": f"/api/v1/jobs/{job.id}/events"}
    return d


def for_reader(doc: dict[str, Any], reader: Principal | None, kind: str,
               target: str) -> dict[str, Any]:
    """A restore's error quotes what the restored file made the database say (user SQL can
    echo anything it reads): only operators and admins of the target see that text."""
    error = doc.get("error")
    if (reader is None or kind != "restore" or not isinstance(error, dict)
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


async def job_for(request: web.Request, role: Role) -> Job:
    """The job named in the path, if the token holds `role` on its target."""
    job = await svc(request).store.get(request.match_info["job_id"])
    require(principal_of(request), role, job.target)
    return job


async def read_json(request: web.Request, allowed: dict[str, type | tuple[type, ...]]
                    ) -> dict[str, Any]:
    """A JSON object body (or none) with only `allowed` keys of the given types."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
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


async def wait_for_job(s: Services, job_id: str, timeout: float) -> Job:
    """Follow the job's event stream until a terminal event or `timeout`; return the job."""
    deadline = time.monotonic() + timeout
    last = "0-0"
    while (left := deadline - time.monotonic()) > 0:
        events = await s.blocking_store.events(job_id, after=last,
                                               block_ms=max(1, int(min(left, 5.0) * 1000)))
        for ev in events:
            last = ev.id
            if ev.type in TERMINAL:
                return await s.store.get(job_id)
        job = await s.store.get(job_id)
        if job.terminal:
            return job
    return await s.store.get(job_id)


async def submit(request: web.Request, kind: str, target: str, params: dict[str, Any],
                 *, ttl_wait: float | None = None,
                 before_enqueue: Callable[[Job], Awaitable[None]] | None = None
                 ) -> tuple[Job, bool]:
    s = svc(request)
    if kind != "stats" and not await live_workers(s):
        if ttl_wait is not None:  # the seed surface waits for the outcome: say so soon
            for _ in range(25):  # a worker starting right now announces itself within 5 s
                await asyncio.sleep(0.2)
                if await live_workers(s):
                    break
            else:
                raise Unavailable(f"no live worker: the {kind} was not started (start one "
                                  "with `safehold worker`)", code="no_worker")
        else:
            request[NO_WORKER] = True  # queued anyway; the answer says why nothing happens
    job, created = await s.store.create(
        kind, target, params, principal(request),
        idempotency_key=request.headers.get("Idempotency-Key") or None)
    request[AUDIT_INFO] = {"job": job.id, "target": target, "backup": params.get("backup")}
    if created:
        if before_enqueue is not None:
            await before_enqueue(job)
        await enqueue(s.redis, s.keys, job)
    wait = query_float(request, "wait", 0, MAX_WAIT) if ttl_wait is None else ttl_wait
    if wait:
        job = await wait_for_job(s, job.id, wait)
    return job, created


NO_WORKER = web.RequestKey("no_worker", bool)
NO_WORKER_WARNING = ("no live worker: the job waits in the queue until one runs (start one "
                     "with `safehold worker`)")


def job_response(job: Job, request: web.Request | None = None) -> web.Response:
    view = job_view(job)
    if request is not None and request.get(NO_WORKER) and not job.terminal:
        view["warnings"] = [NO_WORKER_WARNING]
    return web.json_response(view, status=200 if job.terminal else 202,
                             headers={"Location": f"/api/v1/jobs/{job.id}"})


async def live_workers(s: Services) -> int:
    """Workers that announced themselves in the last 30 s."""
    return int(await s.redis.zcount(s.keys.workers, time.time() - 30, "+inf"))


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
    job, _ = await submit(request, "stats", target, {}, ttl_wait=STATS_WAIT)
    if job.status == "succeeded":
        return web.json_response(job.result)
    if job.status == "failed" and job.error:
        raise SafeholdError(job.error.get("message", "stats failed"),
                            code=job.error.get("code", "stats_failed"))
    return job_response(job, request)


async def target_stats(request: web.Request) -> web.Response:
    return await stats_of(request, svc(request).settings.target(request.match_info["target"]).id)


# ---------------------------------------------------------------------- backups
def backup_view(m: dict[str, Any]) -> dict[str, Any]:
    size = int(m.get("size_bytes") or 0)
    return {**m, "size_mb": round(size / (1024 * 1024), 2),
            "compressed": any(c.get("codec") in ("gzip", "zstd")
                              for c in codecs.chain_of(m)),
            "encrypted": any(c.get("codec") == "age" for c in codecs.chain_of(m)),
            "safety": m.get("kind") == "safety_backup"}


async def create_backup(request: web.Request) -> web.Response:
    s = svc(request)
    target = s.settings.target(request.match_info["target"])
    body = await read_json(request, {"compress": bool, "note": str, "format": str,
                                     "use_apoc": bool})
    if len(body.get("note", "")) > 500:
        raise BadRequest("note is longer than 500 characters", code="invalid_body")
    params = {"compress": body.get("compress", target.compress), "note": body.get("note", "")}
    if "format" in body:
        formats = ENGINE_FORMATS.get(target.engine, ())
        if body["format"] not in formats:
            raise BadRequest(f"format {body['format']!r} is not offered for {target.engine} "
                             f"(one of: {', '.join(formats) or 'none'})", code="invalid_body")
        params["format"] = body["format"]
    if body.get("use_apoc"):
        if target.engine != "neo4j":
            raise BadRequest("use_apoc applies to neo4j targets only", code="invalid_body")
        params["use_apoc"] = True
    job, _ = await submit(request, "backup", target.id, params)
    return job_response(job, request)


async def list_backups(request: web.Request) -> web.Response:
    s = svc(request)
    target = s.settings.target(request.match_info["target"]).id
    manifests = await s.catalog.list_backups(target)
    return web.json_response({"target": target, "total_count": len(manifests),
                              "backups": [backup_view(m) for m in manifests]})


async def manifest_of(request: web.Request, target: str, file: str
                      ) -> tuple[naming.BackupName, dict[str, Any]]:
    """A client-named backup: parsed by the grammar (400), then looked up (404)."""
    name = naming.parse(file)
    manifest = await svc(request).catalog.manifest(target, name)
    return name, manifest


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


async def delete_file(request: web.Request, target: str, file: str) -> str:
    """Delete a backup unless a restore of it is queued or running (409)."""
    s = svc(request)
    name, manifest = await manifest_of(request, target, file)
    for job in await s.store.active_for_target(target):
        if job.kind == "restore" and job.params.get("backup") == name.filename:
            raise Conflict(f"backup {name.filename} is being restored by job {job.id}",
                           code="backup_in_use")
        made_for = manifest.get("parent") == job.id or name.filename == job.safety_backup
        if job.kind == "restore" and made_for:
            raise Conflict(f"{name.filename} is the safety backup of restore job {job.id}, "
                           "which is still running", code="backup_in_use")
    await s.catalog.delete(target, name)
    await stats.catalog_changed(s.redis, s.keys)
    return name.filename


async def get_backup(request: web.Request) -> web.Response:
    target = svc(request).settings.target(request.match_info["target"]).id
    _, manifest = await manifest_of(request, target, request.match_info["file"])
    return web.json_response(backup_view(manifest))


async def download_backup(request: web.Request) -> web.StreamResponse:
    target = svc(request).settings.target(request.match_info["target"]).id
    return await download(request, target, request.match_info["file"])


async def delete_backup(request: web.Request) -> web.Response:
    target = svc(request).settings.target(request.match_info["target"]).id
    deleted = await delete_file(request, target, request.match_info["file"])
    return web.json_response({"deleted": deleted, "target": target})


# ---------------------------------------------------------------------- restores
async def submit_restore(request: web.Request, target: TargetConfig, file: str,
                         safety: bool, *, wait: float | None = None,
                         identity: str | None = None) -> Job:
    name, manifest = await manifest_of(request, target.id, file)
    if manifest.get("engine") != target.engine:
        raise BadRequest(f"{name.filename} is a {manifest.get('engine')} backup; target "
                         f"'{target.id}' is {target.engine}", code="engine_mismatch")
    params: dict[str, Any] = {"backup": name.filename, "create_safety_backup": safety}
    seal = None
    if identity is not None:
        sealed = await seal_identity(svc(request), identity)
        params["identity_supplied"] = True

        async def seal(job: Job) -> None:
            s = svc(request)
            await s.redis.set(s.keys.sealed_identity(job.id), sealed,
                              ex=int(s.settings.worker.job_ttl))

    job, _ = await submit(request, "restore", target.id, params, ttl_wait=wait,
                          before_enqueue=seal)
    return job


async def seal_identity(s: Services, identity: str) -> bytes:
    """An age identity sent with a restore is never stored or logged as such: it is
    encrypted to the ephemeral keys of the live workers (each holds its private half in
    memory only), so only a worker process alive now can open it."""
    if len(identity) > 64 * 1024:
        raise BadRequest("identity is too long", code="invalid_identity")
    codecs.load_identities(identity)  # 400 when it is not an identity
    since = time.time() - 30
    workers = [w.decode() for w in await s.redis.zrangebyscore(s.keys.workers, since, "+inf")]
    keys = []
    if workers:
        found = await s.redis.hmget(s.keys.worker_keys, workers)  # type: ignore[misc]
        keys = [k for k in found if k]
    if not keys:
        raise Unavailable("no live worker to hand the identity to: start one with "
                          "`safehold worker`", code="no_worker")
    import pyrage

    recipients = [pyrage.x25519.Recipient.from_str(k.decode()) for k in keys]
    return bytes(await asyncio.to_thread(pyrage.encrypt, identity.encode(), recipients))


async def create_restore(request: web.Request) -> web.Response:
    target = svc(request).settings.target(request.match_info["target"])
    body = await read_json(request, {"backup": str, "create_safety_backup": bool,
                                     "identity": str})
    if "backup" not in body:
        raise BadRequest("field 'backup' (a backup file name) is required", code="invalid_body")
    job = await submit_restore(request, target, body["backup"],
                               body.get("create_safety_backup", True),
                               identity=body.get("identity"))
    return job_response(job, request)


# ---------------------------------------------------------------------- jobs
async def list_jobs(request: web.Request) -> web.Response:
    s = svc(request)
    q = request.query
    status, kind = q.get("status"), q.get("kind")
    if status and status not in ("queued", "running", "succeeded", "failed", "cancelled"):
        raise BadRequest(f"unknown status '{status}'", code="invalid_query")
    if kind and kind not in ("backup", "restore", "stats", "prune", "verify"):
        raise BadRequest(f"unknown kind '{kind}'", code="invalid_query")
    limit = int(query_float(request, "limit", 1, 1000) or 100)
    p = principal_of(request)
    if q.get("target"):
        require(p, Role.VIEWER, q["target"])
    visible = set(p.targets_visible(list(s.settings.targets)))
    jobs = await s.store.list_jobs(target=q.get("target"), status=status, kind=kind,
                                   limit=limit, targets=visible)
    return web.json_response({"jobs": [job_view(j, p) for j in jobs], "count": len(jobs)})


async def get_job(request: web.Request) -> web.Response:
    return web.json_response(job_view(await job_for(request, Role.VIEWER), principal_of(request)))


async def cancel_job(request: web.Request) -> web.Response:
    s = svc(request)
    job = await job_for(request, Role.OPERATOR)
    if not job.terminal and not job.cancellable:
        raise Conflict("this restore is changing the database and cannot be cancelled safely "
                       f"now ({job.restore_state}); it either completes or rolls back by "
                       "itself", code="restore_running")
    job = await s.store.request_cancel(job.id)
    return web.json_response(job_view(job), status=200 if job.terminal else 202)


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
        since=q.get("since"))
    return web.json_response({"entries": entries, "count": len(entries)})


async def prune(request: web.Request) -> web.Response:
    """Apply the target's retention policy now (a prune job); `dry_run=true` plans only."""
    s = svc(request)
    target = s.settings.target(request.match_info["target"])
    dry_run = query_bool(request, "dry_run", False)
    if not s.settings.retains(target) and not dry_run:
        raise BadRequest(f"target '{target.id}' has no retention policy: nothing would be "
                         "deleted (set [targets.<id>.retention])", code="no_retention")
    job, _ = await submit(request, "prune", target.id, {"dry_run": dry_run,
                                                        "reason": "requested"})
    return job_response(job, request)


async def verify(request: web.Request) -> web.Response:
    """A restore drill of the newest (or the given) backup into a scratch place."""
    s = svc(request)
    target = s.settings.target(request.match_info["target"])
    body = await read_json(request, {"backup": str})
    params: dict[str, Any] = {}
    if "backup" in body:
        name, _ = await manifest_of(request, target.id, body["backup"])
        params["backup"] = name.filename
    job, _ = await submit(request, "verify", target.id, params)
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
            "last_job": state.get("last_job"), "last_status": None}
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
    return web.json_response({"destinations": await svc(request).catalog.health()})


async def jwks(request: web.Request) -> web.Response:
    """The dev-mode signing key's public half (tokens from `safehold token`)."""
    doc = svc(request).dev_jwks
    if doc is None:
        raise NotFound("no local signing key: tokens come from the configured issuer")
    return web.json_response(doc)
