"""Child processes for dump/restore tools: secrets only in the child's environment,
stderr collected (bounded) for error messages, and the child always reaped.

A child gets a minimal environment (PATH, locale, TZ, TMPDIR and what its engine passes: no
other target's password, nothing else of the worker's) and dies with the worker: it is
started with PR_SET_PDEATHSIG = SIGKILL, so a worker killed by the OOM killer cannot leave a
restore tool running on alone."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import os
import select
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from shared.redact import redact

F_SETPIPE_SZ = 1031  # Linux fcntl: grow a pipe's buffer (fewer wake-ups per MiB)
PIPE_SIZE = 1 << 20
# A dump tool writes its stdout in pieces of 4-16 KiB: a read waits up to BATCH_LINGER for
# BATCH_MIN bytes to gather, so the pipeline handles ~30x fewer, larger chunks
BATCH_MIN, BATCH_LINGER = 256 << 10, 0.02
PR_SET_PDEATHSIG = 1
# what a child may inherit from the worker's environment; everything else is left behind
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR")

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


die_with_parent = _die_with_parent  # for children not started through `spawn`


def as_user(user: str) -> list[str]:
    """The argv prefix that runs a program as `user` (a scratch server, when the worker is
    root) and still lets it die with the worker: a change of uid clears the parent-death
    signal (runuser's, or a server's own `--user`, would leave it running after a SIGKILL
    of the worker); setpriv sets it again after the change, as it becomes the program."""
    import pwd

    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
            "--init-groups", "--pdeathsig=KILL", "--"]


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    base = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return {**base, **env}


def read_batch(fd: int, n: int = PIPE_SIZE) -> bytes:
    """Up to `n` bytes of the non-blocking pipe `fd`, blocking until there is at least
    one (b"" at its end); what arrives within BATCH_LINGER is added, up to BATCH_MIN or
    more. A slow producer is passed on at least every BATCH_LINGER."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    parts: list[bytes] = []
    size, deadline = 0, 0.0
    while size < n:
        try:
            data = os.read(fd, n - size)
        except BlockingIOError:
            now = time.monotonic()
            if not parts:
                poller.poll()  # nothing yet: wait for data, or the writer's end (EOF)
                continue
            if size >= BATCH_MIN or (deadline and now >= deadline):
                break
            deadline = deadline or now + BATCH_LINGER
            time.sleep(0.002)  # let the pipe fill a little
            continue
        if not data:
            break  # EOF (a later call returns b"")
        parts.append(data)
        size += len(data)
    return b"".join(parts)


class Child:
    """A running tool with its stderr tail; `on_line` sees each stderr line as it arrives.

    Its stdout (when requested) is a plain pipe read in a thread with large reads: faster
    than an asyncio stream, and the dump never passes through the event loop."""

    def __init__(self, proc: asyncio.subprocess.Process, secrets: Sequence[str],
                 on_line: Callable[[str], None] | None, stdout_fd: int | None = None) -> None:
        self.proc = proc
        self._stdout_fd = stdout_fd
        self._reading: asyncio.Future[bytes] | None = None
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

    async def read(self, n: int = PIPE_SIZE) -> bytes:
        """Up to `n` bytes of the child's stdout; b"" at its end."""
        assert self._stdout_fd is not None, "spawned without stdout=True"
        self._reading = asyncio.ensure_future(asyncio.to_thread(read_batch, self._stdout_fd, n))
        # shielded: a cancelled caller must not abandon a thread inside os.read on our fd;
        # kill() reaps the child (EOF ends the read) and then waits for that thread
        return await asyncio.shield(self._reading)

    async def wait(self) -> int:
        rc = await self.proc.wait()
        await self._stderr_task
        return rc

    async def kill(self) -> None:
        if self.proc.returncode is None:
            # the whole process group (the child not reaped yet: its pid is still its
            # group's): what the tool forked (pg_basebackup's WAL streamer, a parallel
            # dump's workers) dies with it and closes the pipes it inherited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        if self._stdout_fd is not None:
            os.close(self._stdout_fd)
            self._stdout_fd = None


async def feed_stdin(child: Child, prelude: bytes, chunks: AsyncIterator[bytes],
                     on_bytes: Callable[[int], None]) -> None:
    """Write `prelude` then `chunks` to the child's stdin and close it (EOF).

    If the child stops reading, writing ends quietly (its exit code and stderr say why).
    If the *source* fails (a PipelineError, a refused script, a cancellation), the child is
    killed before it sees EOF — a restore tool must never commit a truncated input — and
    the error propagates."""
    stdin = child.proc.stdin
    assert stdin is not None, "spawned without stdin=True"
    try:
        stdin.write(prelude)
        async for chunk in chunks:
            stdin.write(chunk)
            await stdin.drain()
            on_bytes(len(chunk))
        stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except BaseException:
        await asyncio.shield(child.kill())
        raise


@contextlib.asynccontextmanager
async def spawn(argv: Sequence[str], *, env: Mapping[str, str], secrets: Sequence[str] = (),
                stdin: bool = False, stdout: bool = False,
                on_line: Callable[[str], None] | None = None) -> AsyncIterator[Child]:
    """Start `argv` (no secrets in it!) with `env` over a minimal base; kill and reap it on
    exit."""
    full_env = child_env(env)
    read_fd = write_fd = None
    if stdout:
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(read_fd, F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(read_fd, False)  # our end only: see read_batch
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=write_fd if write_fd is not None else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            preexec_fn=_die_with_parent,
            process_group=0,  # its own group: kill() reaches what it forks
        )
    except BaseException:
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
        raise
    if write_fd is not None:
        os.close(write_fd)  # the child holds the only write end: its exit means EOF
    child = Child(proc, secrets, on_line, read_fd)
    try:
        yield child
    finally:
        await asyncio.shield(child.kill())
