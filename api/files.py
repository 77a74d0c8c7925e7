"""Streaming file responses (downloads) and streamed, size-capped uploads."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import aiofiles
import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from shared.errors import BadRequest

CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single-range header; None = whole file; raises 416."""
    m = _RANGE.match(header.strip())
    if not m or (not m[1] and not m[2]):
        return None  # multi-range or junk: RFC 9110 allows ignoring it
    if m[1]:
        start = int(m[1])
        end = min(int(m[2]), size - 1) if m[2] else size - 1
    else:
        start, end = max(size - int(m[2]), 0), size - 1
    if start >= size or start > end:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def send_stream(request: web.Request,
                      open_range: Callable[[int, int], AsyncGenerator[bytes, None]], *, size: int,
                      filename: str, sha256: str, content_type: str,
                      extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Stream a stored backup (`open_range(start, end)` gives its bytes) with
    Content-Length, ETag (its sha256), Range and If-None-Match/If-Range."""
    etag = f'"{sha256}"'
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "X-Checksum-SHA256": sha256,
        "Cache-Control": "private, no-transform",
        **(extra_headers or {}),
    }
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    start, end = 0, size - 1
    status = 200
    range_header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if range_header and size > 0 and (if_range is None or if_range.strip() == etag):
        chosen = _byte_range(range_header, size)
        if chosen is not None:
            start, end = chosen
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = content_type
    resp.content_length = end - start + 1 if size else 0
    await resp.prepare(request)
    if request.method == "HEAD" or size == 0:
        await resp.write_eof()
        return resp
    chunks = open_range(start, end)
    try:
        async for block in chunks:
            await resp.write(block)
    finally:
        await chunks.aclose()
    await resp.write_eof()
    return resp


class UploadSink:
    """Write an upload to a temp file, counting and hashing, refusing past `limit` bytes."""

    def __init__(self, temp_path: Path, limit: int) -> None:
        self.path = temp_path
        self.limit = limit
        self.size = 0
        self.digest = hashlib.sha256()
        self.head = b""  # the first bytes, to sniff the format

    async def __aenter__(self) -> UploadSink:
        self._f = await aiofiles.open(  # private: the upload may be a copy of a database
            self.path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._f.close()

    async def write(self, block: bytes) -> None:
        from shared.errors import TooLarge

        self.size += len(block)
        if self.size > self.limit:
            raise TooLarge(f"upload exceeds the limit of {self.limit} bytes "
                           "(server.max_upload_bytes)")
        if len(self.head) < 4096:
            self.head += block[: 4096 - len(self.head)]
        self.digest.update(block)
        await self._f.write(block)

    async def finish(self) -> None:
        await self._f.flush()
        os.fsync(self._f.fileno())


async def _receive_multipart(request: web.Request, sink: UploadSink) -> str | None:
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if getattr(part, "name", None) != "file":
            continue
        filename = getattr(part, "filename", None)
        while block := await part.read_chunk(CHUNK):  # type: ignore[union-attr]
            await sink.write(block)
        await sink.finish()
        return filename
    raise BadRequest("multipart upload has no 'file' field", code="invalid_upload")


async def receive_upload(request: web.Request, sink: UploadSink) -> str | None:
    """Stream the request body into `sink`: multipart (field `file`) or a raw body.

    Returns the client's file name when one was given."""
    declared = request.content_length
    if declared is not None and declared > sink.limit + 64 * 1024:
        from shared.errors import TooLarge

        raise TooLarge(f"upload of {declared} bytes exceeds the limit of {sink.limit} bytes "
                       "(server.max_upload_bytes)")
    if request.content_type.startswith("multipart/"):
        try:
            return await _receive_multipart(request, sink)
        except (ValueError, aiohttp.http_exceptions.HttpProcessingError,
                RuntimeWarning) as exc:  # aiohttp's BadContentDisposition* (when raised)
            # a NUL or a line break in a part's headers, a broken Content-Disposition,
            # a body that is not the multipart it claims: the client's fault, said so
            raise BadRequest(f"malformed multipart upload ({type(exc).__name__})",
                             code="invalid_upload") from None
    async for block in request.content.iter_chunked(CHUNK):
        await sink.write(block)
    await sink.finish()
    return request.headers.get("X-Filename")
