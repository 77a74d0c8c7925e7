"""The CLI's HTTP and SSE client of a running Safehold API, and what a person sees of a
job (progress bar, one final line). Exit codes: 0 success, 1 the job failed (or another
error, a conflict included), 2 bad usage or a request the API refused as invalid,
3 authentication or permission, 4 not found."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiofiles
import aiohttp

from shared import CLI_AGENT, safehold_version
from shared.errors import SafeholdError
from shared.jobs import TERMINAL, JobStatus
from shared.storage.local import sha256_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
# a JSON object the API answered (its shapes: api/schemas.py, the OpenAPI document): the
# CLI prints what it holds, and a key an older server leaves out shows as empty
ApiDoc = dict[str, Any]
CHUNK = 1 << 20


class ApiError(SafeholdError):
    """An error answer of the API, with the exit code it maps to."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}", code=code)
        self.http_status = status
        self.exit_code = (EXIT_AUTH if status in (401, 403) else EXIT_NOT_FOUND
                          if status == 404 else EXIT_USAGE if status in (400, 413, 422)
                          else EXIT_FAILED)


class Client:
    def __init__(self, base: str, token: str | None) -> None:
        self.base = base.rstrip("/")
        self.headers = {"User-Agent": f"{CLI_AGENT}{safehold_version()}"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession(headers=self.headers,
                                             timeout=aiohttp.ClientTimeout(total=None,
                                                                           sock_connect=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, **kw: Any) -> ApiDoc:
        async with self.session.request(method, self.base + path, **kw) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 400:
                err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
                raise ApiError(resp.status, str(err.get("code")), str(err.get("message")))
            if not isinstance(body, dict):
                raise ApiError(resp.status, "invalid_answer",
                               f"the server answered {method} {path} with no JSON object")
            return body

    async def events(self, job_id: str) -> AsyncIterator[ApiDoc]:
        """Follow a job's SSE stream, reconnecting with Last-Event-ID if it drops."""
        last: str | None = None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with self.session.get(f"{self.base}/api/v1/jobs/{job_id}/events",
                                            headers=headers) as resp:
                    if resp.status != 200:
                        raise ApiError(resp.status, "event_stream",
                                       f"event stream answered {resp.status}")
                    data: list[str] = []
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("id:"):
                            last = line[3:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].lstrip())
                        elif line == "" and data:
                            event = json.loads("\n".join(data))
                            data = []
                            yield event
                            if event.get("type") in TERMINAL:
                                return
                    return
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                    aiohttp.ClientConnectionError):
                await asyncio.sleep(1)

    async def upload(self, path: str, target: str, file: Path, *, restore: bool,
                     safety: bool) -> ApiDoc:
        """Stream a file as the raw request body, with a progress bar on stderr."""
        size = (await asyncio.to_thread(file.stat)).st_size
        bar = Bar(size)

        async def body() -> AsyncIterator[bytes]:
            async with aiofiles.open(file, "rb") as f:
                while block := await f.read(CHUNK):
                    bar.add(len(block))
                    yield block
            bar.done()

        query = f"?restore={'true' if restore else 'false'}&create_safety_backup=" \
                f"{'true' if safety else 'false'}"
        return await self.call("POST", f"{path}{query}", data=body(), headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(size),
            "X-Filename": file.name})

    async def download(self, target: str, name: str, out: Path) -> ApiDoc:
        """Download into `out` (resuming a `.part` left by an interrupted run with Range),
        verify the sha256 against the manifest, then move it into place."""
        manifest = await self.call("GET", f"/api/v1/targets/{target}/backups/{name}")
        expected, size = manifest.get("sha256"), int(manifest.get("size_bytes") or 0)
        part = out.with_name(out.name + ".part")
        have = await asyncio.to_thread(_size_or_zero, part)
        if have > size:
            await asyncio.to_thread(part.unlink)
            have = 0
        bar = Bar(size, have)
        headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
        if have < size:
            url = f"{self.base}/api/v1/targets/{target}/backups/{name}/download"
            async with self.session.get(url, headers=headers) as resp:
                if resp.status >= 400:
                    body = await resp.json(content_type=None)
                    err = (body or {}).get("error", {})
                    raise ApiError(resp.status, str(err.get("code")), str(err.get("message")))
                mode = "ab" if resp.status == 206 else "wb"
                if mode == "wb":
                    bar = Bar(size)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | (
                    os.O_APPEND if mode == "ab" else os.O_TRUNC), 0o600)
                with os.fdopen(fd, mode) as f:
                    async for block in resp.content.iter_chunked(CHUNK):
                        await asyncio.to_thread(f.write, block)
                        bar.add(len(block))
        bar.done()
        got = await asyncio.to_thread(sha256_file, part)
        if got != expected:
            await asyncio.to_thread(part.unlink)
            raise ApiError(502, "checksum_mismatch",
                           f"the downloaded file's sha256 is {got}, the manifest says "
                           f"{expected}: removed, run the download again")
        await asyncio.to_thread(part.replace, out)
        return {"file": str(out), "size_bytes": size, "sha256": expected}


def _size_or_zero(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class Bar:
    """A byte progress bar on stderr (a TTY only; nothing in logs and pipes)."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.done_bytes = total, done
        self.tty = sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.done_bytes += n
        if self.tty:
            pct = 100.0 * self.done_bytes / self.total if self.total else 100.0
            print(f"\r{bar(pct)} {pct:5.1f}% {mib(self.done_bytes)} of {mib(self.total)}",
                  end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def mib(n: float | None) -> str:
    """Binary units, named as such."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def bar(percent: float | None, width: int = 30) -> str:
    filled = int(width * (percent or 0) / 100)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render_progress(p: ApiDoc) -> str:
    pct = p.get("percent")
    items = ""
    if p.get("items_total"):
        items = f" {p.get('items_done', 0)}/{p['items_total']} {p.get('item_kind', '')}"
    eta = f" ETA {p['eta_s']:.0f}s" if p.get("eta_s") is not None else ""
    pct_s = f"{pct:5.1f}%" if pct is not None else "  ?  %"
    return (f"{bar(pct)} {pct_s} {p.get('phase', ''):<14} {mib(p.get('bytes_done'))}"
            f" {mib(p.get('rate_bps'))}/s{items}{eta}")


def final_line(job: ApiDoc) -> str:
    """`✓ backup_… 98.9 MiB in 4.2 s (sha256 …)` or `✗ <code>: <message>`."""
    result = job.get("result") or {}
    if job.get("status") == JobStatus.SUCCEEDED:
        took = result.get("duration_s")
        # a backup's file, a restore's backup (`restored`), a drill's backup
        what = (result.get("filename") or result.get("restored") or result.get("backup")
                or job.get("kind"))
        parts = [f"✓ {job.get('kind')} {what}"]
        if result.get("size_bytes") is not None:
            parts.append(mib(result["size_bytes"]))
        if took is not None:
            parts.append(f"in {took:.1f} s")
        if result.get("sha256"):
            parts.append(f"(sha256 {result['sha256'][:16]}…)")
        if result.get("safety_backup"):
            parts.append(f"— safety backup {result['safety_backup']}")
        if result.get("database_state"):
            parts.append(f"— database {result['database_state']}")
        return " ".join(parts)
    err = job.get("error") or {}
    line = f"✗ {err.get('code', job.get('status'))}: {err.get('message', job.get('status'))}"
    if err.get("database_state"):
        line += f" (database {err['database_state']})"
    return line
