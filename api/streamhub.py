"""One blocking read per API process for every live event stream.

Each SSE client (and each `?wait`) used to hold its own `XREAD BLOCK` on a pool of 64
connections: a few dozen followers exhausted it. The hub runs one reader task that
blocks on all the streams someone follows, with one connection, and hands each new entry
to the followers' queues. A follower first replays what it missed with non-blocking
`XRANGE` (resumable `Last-Event-ID` stays exact), registers, replays once more to close
the gap to the reader's position, and drops duplicates by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.jobs import Event, _event

log = logging.getLogger("safehold.api")
BLOCK_MS = 250  # a stream followed for the first time joins the read within this
PAGE = 500


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms or 0), int(seq or 0)


class StreamHub:
    def __init__(self, reader: Redis, replay: Redis) -> None:
        self.reader, self.replay = reader, replay
        self._followers: dict[str, set[asyncio.Queue[Event]]] = {}
        self._position: dict[str, str] = {}  # stream -> last id the reader has seen
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def latest(self, stream: str) -> str:
        rows = await self.replay.xrevrange(stream, count=1)
        return rows[0][0].decode() if rows else "0-0"

    async def _range(self, stream: str, after: str) -> list[Event]:
        out: list[Event] = []
        while True:
            rows = await self.replay.xrange(stream, min=f"({after}", count=PAGE)
            out += [_event(i, f) for i, f in rows]
            if len(rows) < PAGE:
                return out
            after = rows[-1][0].decode()

    async def follow(self, stream: str, after: str = "0-0", *, idle: float = 5.0
                     ) -> AsyncGenerator[Event | None, None]:
        """Events of `stream` strictly after `after`, then live; None after `idle`
        seconds without one (the caller may check whether to go on)."""
        last = after
        for ev in await self._range(stream, last):
            last = ev.id
            yield ev
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._followers.setdefault(stream, set()).add(queue)
        self._position.setdefault(stream, last)
        self._start()
        try:
            for ev in await self._range(stream, last):  # what arrived while registering
                last = ev.id
                yield ev
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), idle)
                except TimeoutError:
                    yield None
                    continue
                if _id(ev.id) <= _id(last):
                    continue  # already replayed
                last = ev.id
                yield ev
        finally:
            followers = self._followers.get(stream)
            if followers is not None:
                followers.discard(queue)
                if not followers:
                    del self._followers[stream]
                    self._position.pop(stream, None)

    def _start(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self._followers:
                self._wake.clear()
                await self._wake.wait()
                continue
            streams: dict[Any, Any] = {s: self._position[s] for s in list(self._followers)
                                       if s in self._position}
            try:
                answer = await self.reader.xread(streams, count=PAGE, block=BLOCK_MS)
            except (RedisError, OSError) as exc:
                log.warning("event streams: Redis unreachable (%s); retrying",
                            type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for key, entries in answer or []:
                stream = key.decode() if isinstance(key, bytes) else str(key)
                for entry_id, fields in entries:
                    ev = _event(entry_id, fields)
                    self._position[stream] = ev.id
                    for queue in list(self._followers.get(stream, ())):
                        with contextlib.suppress(asyncio.QueueFull):
                            queue.put_nowait(ev)
