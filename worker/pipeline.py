"""The byte-stream pipeline: sync stages, one async driver.

Backup:  source chunks -> [gzip] -> sha256 -> temp file      (`store`)
Restore: stored file -> [gunzip] -> chunks                    (`read_stored`)

Stages are plain sync objects (`feed`/`flush`); the driver runs them in a thread so
compression never blocks the event loop, while a reader task keeps draining the source
into a small bounded queue (back-pressure: at most QUEUE_DEPTH chunks in memory).
gzip comes from python-isal (standard gzip output, ~10x stdlib zlib); zlib is the fallback.
"""

from __future__ import annotations

import asyncio
import hashlib
import types
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from shared.errors import PipelineError
from shared.storage import TempFile

_gz: types.ModuleType
try:
    from isal import isal_zlib

    _gz, GZIP_IMPL, MAX_LEVEL = isal_zlib, "isal", 3
    _GZ_ERRORS: tuple[type[Exception], ...] = (zlib.error, isal_zlib.error)  # type: ignore[assignment]
except ImportError:  # pragma: no cover - isal has wheels for our platforms
    _gz, GZIP_IMPL, MAX_LEVEL = zlib, "zlib", 9
    _GZ_ERRORS = (zlib.error,)

CHUNK = 1 << 20
QUEUE_DEPTH = 8
GZIP_WBITS = 31  # gzip container


class Stage(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class GzipCompress:
    def __init__(self, level: int) -> None:
        self._c = _gz.compressobj(min(level, MAX_LEVEL), zlib.DEFLATED, GZIP_WBITS)

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class GzipDecompress:
    """Decompresses gzip, including multi-member files (`cat a.gz b.gz`); rejects truncation."""

    def __init__(self) -> None:
        self._d = _gz.decompressobj(GZIP_WBITS)
        self._in_member = False

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_member = True
            try:
                out.append(self._d.decompress(data))
            except _GZ_ERRORS as exc:
                raise PipelineError(f"the backup is not valid gzip: {exc}",
                                    code="corrupt_backup") from None
            if not self._d.eof:
                break
            self._in_member = False
            data = self._d.unused_data
            self._d = _gz.decompressobj(GZIP_WBITS)
        return b"".join(out)

    def flush(self) -> bytes:
        if self._in_member:
            raise PipelineError("the backup's gzip stream is truncated", code="corrupt_backup")
        return b""


def run_stages(stages: Sequence[Stage], data: bytes, final: bool = False) -> bytes:
    for s in stages:
        data = s.feed(data)
        if final:
            data += s.flush()
    return data


async def _prefetch(source: AsyncIterator[bytes], queue: asyncio.Queue[bytes | None],
                    count: Callable[[int], None]) -> None:
    buf: list[bytes] = []
    size = 0
    async for chunk in source:
        count(len(chunk))
        buf.append(chunk)
        size += len(chunk)
        if size >= CHUNK:
            await queue.put(b"".join(buf))
            buf, size = [], 0
    if buf:
        await queue.put(b"".join(buf))
    await queue.put(None)


async def store(source: AsyncIterator[bytes], temp: TempFile, *, compress: bool, level: int,
                on_bytes: Callable[[int], None]) -> dict[str, Any]:
    """Drain `source` through [gzip] and sha256 into `temp`; return size/sha256/raw size."""
    stages: list[Stage] = [GzipCompress(level)] if compress else []
    digest = hashlib.sha256()
    totals = {"raw": 0, "stored": 0}

    def count(n: int) -> None:
        totals["raw"] += n
        on_bytes(n)

    def process(chunk: bytes, final: bool) -> None:
        out = run_stages(stages, chunk, final)
        if out:
            digest.update(out)
            temp.write(out)
            totals["stored"] += len(out)

    queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
    reader = asyncio.create_task(_prefetch(source, queue, count))
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                reader.result()  # the source failed: raise its error
                continue  # reader finished normally; the sentinel is in the queue
            chunk = get.result()
            if chunk is None:
                break
            await asyncio.to_thread(process, chunk, False)
        await asyncio.to_thread(process, b"", True)
        await reader
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return {"size_bytes": totals["stored"], "sha256": digest.hexdigest(),
            "raw_bytes": totals["raw"]}


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Blocking: hash a stored file in 1 MiB reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            if on_bytes:
                on_bytes(len(block))
    return h.hexdigest()


async def read_stored(path: Path, *, decompress: bool,
                      on_bytes: Callable[[int], None] | None = None) -> AsyncIterator[bytes]:
    """Yield the plain content of a stored backup; read+gunzip run in a thread, one ahead."""
    stages: list[Stage] = [GzipDecompress()] if decompress else []
    f = await asyncio.to_thread(open, path, "rb")
    state = {"eof": False}

    def next_block() -> bytes | None:
        if state["eof"]:
            return None
        block = f.read(CHUNK)
        if not block:
            state["eof"] = True
            return run_stages(stages, b"", True)
        if on_bytes:
            on_bytes(len(block))
        return run_stages(stages, block)

    pending = asyncio.ensure_future(asyncio.to_thread(next_block))
    try:
        while (out := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next_block))
            if out:
                yield out
    finally:
        if not pending.done():
            pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await asyncio.to_thread(f.close)
