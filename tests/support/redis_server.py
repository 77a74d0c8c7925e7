"""A private redis-server on a free port, for tests that kill and restart Redis (never
the shared server). The `private_redis` fixture is in tests/slow/conftest.py."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
from pathlib import Path

from tests.helpers import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    def __init__(self, port: int, directory: Path, *, aof: bool = False) -> None:
        self.port, self.dir, self.aof = port, directory, aof
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is needed (scripts/test.sh installs it)"
        self.proc = await asyncio.create_subprocess_exec(
            server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.aof else "no", "--appendfsync", "always",
            "--dir", str(self.dir),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

        def answers() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        await wait_for(answers, 10, "redis-server to listen")

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
