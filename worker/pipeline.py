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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from shared.codecs import CHUNK, GZIP_IMPL, GzipCompress, GzipDecompress, PlainReader, Stage
from shared.storage import TempFile

__all__ = ["CHUNK", "GZIP_IMPL", "GzipCompress", "GzipDecompress", "read_stored", "store"]
QUEUE_DEPTH = 8  # chunks of ~1 MiB between the reader and the compressor


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


async def read_stored(path: Path, *, decompress: bool, limit: int | None = None,
                      expect_sha256: str | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> AsyncIterator[bytes]:
    """Yield the plain content of a stored backup in chunks of at most ~1 MiB; reading and
    gunzip run in a thread, one chunk ahead of the consumer. See `PlainReader` for `limit`
    and `expect_sha256` (the stream ends only after the digest matched)."""
    reader = await asyncio.to_thread(PlainReader, path, compressed=decompress, limit=limit,
                                     expect_sha256=expect_sha256, on_stored=on_bytes)
    pending = asyncio.ensure_future(asyncio.to_thread(reader.next_chunk))
    try:
        while (out := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(reader.next_chunk))
            yield out
    finally:
        if not pending.done():
            pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await asyncio.to_thread(reader.close)
