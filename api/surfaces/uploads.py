"""POST /api/v1/targets/{target}/uploads: a backup file from the client, stored through
`Operations.upload` (api/upload_store.py), optionally restored right after."""

from __future__ import annotations

from aiohttp import web

from api.files import receive_upload
from api.http import caller, job_view, ops, query_bool, query_float
from api.operations import MAX_WAIT


async def upload_backup(request: web.Request) -> web.Response:
    """POST /api/v1/targets/{target}/uploads[?restore=true&create_safety_backup=…]"""
    restore = query_bool(request, "restore", False)
    safety = query_bool(request, "create_safety_backup", True)
    who = caller(request)
    manifest = await ops(request).upload(who, request.match_info["target"],
                                         lambda sink: receive_upload(request, sink))
    if not restore:
        return web.json_response(manifest, status=201)
    job = await ops(request).start_restore(
        who, request.match_info["target"], manifest["filename"], safety=safety,
        wait=query_float(request, "wait", 0, MAX_WAIT))
    return web.json_response({"upload": manifest, "job": job_view(job)},
                             status=200 if job.terminal else 202,
                             headers={"Location": f"/api/v1/jobs/{job.id}"})
