"""Uploads: streamed to storage, size-capped, hashed, validated, then listed as `upload_…`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from api.files import UploadSink, receive_upload
from api.handlers import job_view, principal, query_bool, submit, svc
from shared import formats, naming
from shared.codecs import GZIP_MAGIC, plain_limit
from shared.config import TargetConfig
from shared.jobs import now_iso

_UNSAFE = re.compile(r"[^\w.\- ()+]")


def _client_name(name: str | None) -> str | None:
    """The client's file name, for the manifest only (never used as a path)."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("_", base)[:200] or None


async def store_upload(request: web.Request, target: TargetConfig) -> dict[str, Any]:
    """Receive, validate and publish an upload; on any failure nothing is left behind."""
    s = svc(request)
    temp = await asyncio.to_thread(s.storage.temp_path, target.id, "upload")
    started = datetime.now(UTC)
    try:
        async with UploadSink(temp, s.settings.server.max_upload_bytes) as sink:
            client_name = await receive_upload(request, sink)
        if sink.size == 0:
            from shared.errors import BadRequest

            raise BadRequest("the upload is empty", code="invalid_upload")
        compressed = sink.head.startswith(GZIP_MAGIC)
        limits = s.settings.limits
        limit = plain_limit(sink.size, max_bytes=limits.max_restore_bytes,
                            ratio=limits.max_expansion_ratio)
        info = await asyncio.get_running_loop().run_in_executor(
            s.validation_pool, functools.partial(
                formats.validate, target.engine, temp, compressed, limit=limit))
        formats.check_scope(target.engine, target.url or "", info)
        name = naming.new_name("upload", target.engine, started, compressed=compressed)
        manifest = {
            "engine": target.engine,
            "kind": "upload",
            "created_at": started.isoformat().replace("+00:00", "Z"),
            "finished_at": now_iso(),
            "size_bytes": sink.size,
            "sha256": sink.digest.hexdigest(),
            "compression": {"algorithm": "gzip"} if compressed else None,
            "encryption": None,
            "original_filename": _client_name(client_name),
            "requested_by": principal(request),
            "server_version": None,
            **info,
        }
        final = await asyncio.to_thread(s.storage.publish, target.id, temp, name, manifest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(temp.unlink)
        raise
    return await asyncio.to_thread(s.storage.manifest, target.id, final)


async def upload_backup(request: web.Request) -> web.Response:
    """POST /api/v1/targets/{target}/uploads[?restore=true&create_safety_backup=…]"""
    s = svc(request)
    target = s.settings.target(request.match_info["target"])
    restore = query_bool(request, "restore", False)
    safety = query_bool(request, "create_safety_backup", True)
    manifest = await store_upload(request, target)
    if not restore:
        return web.json_response(manifest, status=201)
    job, _ = await submit(request, "restore", target.id,
                          {"backup": manifest["filename"], "create_safety_backup": safety})
    return web.json_response({"upload": manifest, "job": job_view(job)},
                             status=200 if job.terminal else 202,
                             headers={"Location": f"/api/v1/jobs/{job.id}"})
