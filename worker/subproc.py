"""Child processes for dump/restore tools: secrets only in the child's environment,
stderr collected (bounded) for error messages, and the child always reaped."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from shared.redact import redact


class Child:
    """A running tool with its stderr tail; `lines` sees each stderr line as it arrives."""

    def __init__(self, proc: asyncio.subprocess.Process, secrets: Sequence[str],
                 on_line: Callable[[str], None] | None) -> None:
        self.proc = proc
        self.secrets = list(secrets)
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._on_line = on_line
        self._stderr_task = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if self._on_line:
                self._on_line(text)
            self.tail.append(text)

    def error_text(self, *, skip: Callable[[str], bool] | None = None, last: int = 8) -> str:
        """The last meaningful stderr lines, redacted."""
        lines = [ln for ln in self.tail if ln and not (skip and skip(ln))]
        return redact(" | ".join(lines[-last:]), self.secrets) or "(no error output)"

    async def wait(self) -> int:
        rc = await self.proc.wait()
        await self._stderr_task
        return rc

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task


@contextlib.asynccontextmanager
async def spawn(argv: Sequence[str], *, env: Mapping[str, str], secrets: Sequence[str] = (),
                stdin: bool = False, stdout: bool = False,
                on_line: Callable[[str], None] | None = None) -> AsyncIterator[Child]:
    """Start `argv` (no secrets in it!) with `env` added; kill and reap it on exit."""
    full_env = {**os.environ, **env}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        limit=1 << 20,
    )
    child = Child(proc, secrets, on_line)
    try:
        yield child
    finally:
        await asyncio.shield(child.kill())
