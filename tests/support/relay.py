"""A TCP relay in front of a server (Redis, S3): cutting it makes that server unreachable
for whoever goes through it, alone; starting it again (same port) brings it back."""

from __future__ import annotations

import asyncio

from tests.support.redis_server import free_port


class Proxy:
    """A TCP relay between the worker and Redis: cutting it isolates the worker alone."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.port = upstream, free_port()
        self.server: asyncio.base_events.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
            self.links.update({w, uw})
            await asyncio.gather(relay(r, uw), relay(ur, w))

        self.server = await asyncio.start_server(accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.links:
            w.transport.abort()
        self.links.clear()
        await self.server.wait_closed()
