"""The seed-compatible surface: `/backup/*` exactly as the original service's README has it.

Same paths, query parameters, form fields and response fields, on the default target or
`?database=<target>`. Each call runs as an ordinary job and waits for it (up to
`server.wait_timeout`); if the job is still running then, the answer is 202 with the job's
URL, so a script can poll `/api/v1/jobs/{id}`.
"""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from api.auth import Principal
from api.context import PRINCIPAL
from api.files import receive_upload
from api.http import (
    caller,
    for_reader,
    idempotency_key,
    job_view,
    ops,
    query_bool,
    svc,
)
from api.surfaces.rest import download, stats_of
from shared.config import TargetConfig
from shared.errors import Unprocessable
from shared.jobs import Job, JobStatus
from shared.manifests import count_in

# job failures caused by the request itself (answered 400, not 500)
CLIENT_ERRORS = frozenset({"apoc_unavailable", "engine_mismatch", "bad_request"})


def seed_target(request: web.Request) -> TargetConfig:
    s = svc(request)
    return s.settings.target(request.query.get("database") or s.settings.default_target)


def _size_mb(size: int) -> float:
    return round(size / (1024 * 1024), 2)


def _not_done(job: Job, reader: Principal) -> web.Response | None:
    """The answer for a job that did not succeed: 500 with its error, or 202 while running."""
    if job.status == JobStatus.SUCCEEDED:
        return None
    url = f"/api/v1/jobs/{job.id}"
    if not job.terminal:
        return web.json_response(
            {"success": False, "message": f"the {job.kind} is still running: follow {url}",
             "job": url, "job_id": job.id, "status": job.status},
            status=202, headers={"Location": url})
    shown = for_reader(job.to_dict(), reader, job.kind, job.target).get("error")
    err: dict[str, object] = shown if isinstance(shown, dict) else {
        "code": job.status, "message": f"the {job.kind} was {job.status}"}
    status = 500 if job.status == JobStatus.FAILED else 409
    if err.get("code") in CLIENT_ERRORS:
        status = 400
    return web.json_response(
        {"success": False, "message": f"{job.kind.capitalize()} failed: {err['message']}",
         "detail": err["message"], "error": err, "job": job_view(job, reader)},
        status=status)


async def create(request: web.Request) -> web.Response:
    target = seed_target(request)
    use_apoc = query_bool(request, "use_apoc", False)
    if use_apoc and target.engine != "neo4j":
        raise Unprocessable("use_apoc applies to neo4j targets only", code="invalid_query")
    job = await ops(request).start_backup(
        caller(request, "seed"), target.id, compress=query_bool(request, "compress", True),
        use_apoc=use_apoc, idempotency_key=idempotency_key(request),
        wait=svc(request).settings.server.wait_timeout, fail_fast=True)
    if (other := _not_done(job, request[PRINCIPAL])) is not None:
        return other
    result = job.result or {}
    return web.json_response({
        "success": True,
        "message": f"Backup created successfully: {result['filename']}",
        "filename": result["filename"],
        "size_mb": _size_mb(count_in(result, "size_bytes") or 0),
    })


async def download_file(request: web.Request) -> web.StreamResponse:
    return await download(request, seed_target(request).id, request.match_info["filename"])


def _restored(job: Job, message: str) -> web.Response:
    safety = (job.result or {}).get("safety_backup")
    return web.json_response({"success": True, "message": message,
                              "safety_backup_created": safety is not None,
                              "safety_backup_filename": safety})


async def restore(request: web.Request) -> web.Response:
    target = seed_target(request)
    safety = query_bool(request, "create_safety_backup", True)
    job = await ops(request).start_restore(
        caller(request, "seed"), target.id, request.match_info["filename"], safety=safety,
        wait=svc(request).settings.server.wait_timeout, fail_fast=True)
    if (other := _not_done(job, request[PRINCIPAL])) is not None:
        return other
    return _restored(job, f"Database restored successfully from: {job.params['backup']}")


async def restore_upload(request: web.Request) -> web.Response:
    target = seed_target(request)
    safety = query_bool(request, "create_safety_backup", True)
    who = caller(request, "seed")
    manifest = await ops(request).upload(who, target.id,
                                         lambda sink: receive_upload(request, sink))
    job = await ops(request).start_restore(
        who, target.id, manifest["filename"], safety=safety,
        wait=svc(request).settings.server.wait_timeout, fail_fast=True)
    if (other := _not_done(job, request[PRINCIPAL])) is not None:
        return other
    shown = manifest.get("original_filename") or manifest["filename"]
    return _restored(job, f"Database restored successfully from uploaded file: {shown}")


def _seed_time(iso: str) -> str:
    """The seed's `created_at`: ISO seconds, UTC, no zone suffix (2024-11-10T12:00:00)."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return iso


async def list_backups(request: web.Request) -> web.Response:
    target = seed_target(request)
    views, unavailable = await ops(request).backups(caller(request, "seed"), target.id)
    backups = []
    for view in views:
        backups.append({
            "filename": view["filename"],
            "size_bytes": view["size_bytes"],
            "size_mb": view["size_mb"],
            "created_at": _seed_time(str(view.get("created_at", ""))),
            "compressed": view["compressed"],
            "kind": view.get("kind"),
            "safety": view["safety"],
            "sha256": view.get("sha256"),
            **({"damaged": view["damaged"]} if view.get("damaged") else {}),
        })
    return web.json_response({"backups": backups, "total_count": len(backups),
                              **({"unavailable": unavailable} if unavailable else {})})


async def delete(request: web.Request) -> web.Response:
    deleted = await ops(request).delete_backup(caller(request, "seed"), seed_target(request).id,
                                               request.match_info["filename"])
    return web.json_response({"success": True,
                              "message": f"Backup deleted successfully: {deleted}"})


async def stats(request: web.Request) -> web.Response:
    return await stats_of(request, seed_target(request).id)
