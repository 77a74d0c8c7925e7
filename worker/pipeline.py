"""The byte-stream pipeline of a backup: source chunks -> codec chain -> sha256 -> sink.

Codec stages are plain sync objects (`feed`/`flush`, see `shared.codecs`); the driver runs
them in a thread so compression and encryption never block the event loop, while a reader
task keeps draining the source into a small bounded queue (back-pressure: at most
QUEUE_DEPTH chunks in memory). The sink is the fan-out to the target's destinations.
Reading a stored backup back is `shared.codecs.PlainReader` (`stored_plain` here).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from shared.codecs import CHUNK, PlainReader, Stage, Step, WindowDigests
from shared.codecs.base import AgeKey
from shared.errors import IntegrityError

QUEUE_DEPTH = 8  # chunks of ~1 MiB between the reader and the encoders


class Sink(Protocol):
    async def write(self, data: bytes) -> None: ...


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
        if len(chunk) > 2 * CHUNK:  # one big piece (a Redis key's payload): in CHUNK slices,
            if buf:                 # so no stage makes a copy of its whole size
                await queue.put(b"".join(buf))
                buf, size = [], 0
            view = memoryview(chunk)
            for i in range(0, len(chunk), CHUNK):
                await queue.put(bytes(view[i:i + CHUNK]))
            continue
        buf.append(chunk)
        size += len(chunk)
        if size >= CHUNK:
            await queue.put(b"".join(buf))
            buf, size = [], 0
    if buf:
        await queue.put(b"".join(buf))
    await queue.put(None)


async def store(source: AsyncIterator[bytes], sink: Sink, stages: Sequence[Stage], *,
                on_bytes: Callable[[int], None]) -> dict[str, Any]:
    """Drain `source` through `stages` and sha256 into `sink`; return size/sha256/raw size."""
    digest = hashlib.sha256()
    totals = {"raw": 0, "stored": 0}

    def count(n: int) -> None:
        totals["raw"] += n
        on_bytes(n)

    def process(chunk: bytes, final: bool) -> bytes:
        out = run_stages(stages, chunk, final)
        if out:
            digest.update(out)
            totals["stored"] += len(out)
        return out

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
            if out := await asyncio.to_thread(process, chunk, False):
                await sink.write(out)
        if out := await asyncio.to_thread(process, b"", True):
            await sink.write(out)
        await reader
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        for stage in stages:  # a stage with a thread (age) must not outlive the backup
            close = getattr(stage, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
    return {"size_bytes": totals["stored"], "sha256": digest.hexdigest(),
            "raw_bytes": totals["raw"]}


async def stored_plain(chunks: AsyncIterator[bytes], chain: Sequence[Step], *,
                       limit: int | None = None, expect_sha256: str | None = None,
                       identities: Sequence[AgeKey] = (),
                       on_bytes: Callable[[int], None] | None = None,
                       on_open: Callable[[PlainReader], Awaitable[None]] | None = None
                       ) -> AsyncGenerator[bytes, None]:
    """Yield the plain content of a stored backup (its stored byte stream `chunks`) in
    chunks of at most ~1 MiB; decoding runs in a thread, one chunk ahead of the consumer.
    See `PlainReader` for `limit` and `expect_sha256` (the stream ends only after the
    digest matched)."""
    from shared.storage.catalog import BlockingStream

    raw = BlockingStream(chunks, asyncio.get_running_loop())
    reader = await asyncio.to_thread(PlainReader, raw, chain, limit=limit,
                                     expect_sha256=expect_sha256, on_stored=on_bytes,
                                     identities=identities, close=raw.close)
    pending = asyncio.ensure_future(asyncio.to_thread(reader.next_chunk))
    try:
        while (out := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(reader.next_chunk))
            yield out
    finally:
        # never abandon the decoding thread: tell it to stop, wait for it, then close
        if not pending.done():
            reader.stop()
            await asyncio.wait({pending})
        await asyncio.gather(pending, return_exceptions=True)
        await asyncio.to_thread(reader.close)


class SameAsChecked(AsyncIterator[bytes]):
    """A restore's plain stream, passed on in whole windows (`WindowDigests.WINDOW`) only
    once each hashes to what the check before the restore read (`digests`): a backup
    changed between the two reads is refused before a byte of the change reaches the
    database, so an engine need not check the content a second time on its way in."""

    def __init__(self, chunks: AsyncIterator[bytes], digests: bytes,
                 window: int = WindowDigests.WINDOW) -> None:
        self.chunks, self.digests, self.window = chunks, digests, window
        self._stream = self._windows()

    def __aiter__(self) -> SameAsChecked:
        return self

    async def __anext__(self) -> bytes:
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _check(self, window: bytes, index: int) -> None:
        expected = self.digests[32 * index:32 * index + 32]
        if hashlib.sha256(window).digest() != expected:
            raise IntegrityError("the backup changed since it was checked (window "
                                 f"{index}); nothing of the change was loaded")

    async def _windows(self) -> AsyncGenerator[bytes, None]:
        size = self.window
        buf, index = bytearray(), 0
        async for chunk in self.chunks:
            buf += chunk
            while len(buf) >= size:
                with memoryview(buf) as view:
                    window = bytes(view[:size])  # one copy, not two
                del buf[:size]
                self._check(window, index)
                index += 1
                yield window
        if buf:
            window = bytes(buf)
            self._check(window, index)
            index += 1
            yield window
        if 32 * index != len(self.digests):
            raise IntegrityError("the backup changed since it was checked (it is shorter); "
                                 "refusing to finish the restore")
