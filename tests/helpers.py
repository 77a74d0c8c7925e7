"""Helpers shared by the test modules: waiting, locking, hand-made backups, worker processes."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import sys
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from tests import pg, procs
from tests.conftest import PASSWORD_ENV, make_raw_config

REPO = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def table_lock(db: str, table: str, mode: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold a lock on `table` in an open transaction until the block ends."""
    conn = await pg.admin_conn(db)
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"LOCK TABLE {table} IN {mode} MODE")
    try:
        yield conn
    finally:
        await tr.rollback()
        await conn.close()


async def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def start_backup_until_pg_dump(api: Any, pg_db: str) -> tuple[str, list[int]]:
    """Submit a backup and wait until its pg_dump runs (blocked by a held table lock)."""
    job_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
    pids = await wait_for(lambda: procs.find("pg_dump", {"PGDATABASE": pg_db}), 30,
                          "pg_dump to start")
    return job_id, pids


def temp_files(d: Path) -> list[Path]:
    return list(d.glob(".tmp-*")) if d.exists() else []


async def listing(api: Any) -> list[str]:
    body = await (await api.get("/api/v1/targets/main/backups")).json()
    return [b["filename"] for b in body["backups"]]


def flip_byte(path: Path, at: int) -> None:
    """Damage one byte of a stored backup (its manifest's sha256 no longer matches)."""
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


def named_like(like: dict[str, Any], name: str) -> dict[str, Any]:
    """`like` (another backup's manifest) made to agree with the object `name`: its file,
    engine, kind and time are the name's, as shared/manifests.py requires."""
    from shared import naming

    parsed = naming.parse(name)
    return {**like, "filename": name, "kind": parsed.kind, "engine": parsed.engine,
            "created_at": parsed.created_at.isoformat().replace("+00:00", "Z")}


async def publish_plain(storage_dir: Path, name: str, sql: bytes, like: dict[str, Any]) -> None:
    """Store a hand-made backup with a correct manifest (what an operator might upload)."""
    blob = gzip.compress(sql)
    (storage_dir / name).write_bytes(blob)
    manifest = {**named_like(like, name), "sha256": hashlib.sha256(blob).hexdigest(),
                "size_bytes": len(blob), "raw_bytes": len(sql)}
    (storage_dir / f"{name}.json").write_text(json.dumps(manifest))


async def wait_for_terminal(api: Any, job_id: str, timeout: float = 90) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = await wait_for(done, timeout, f"job {job_id} to finish")
    return result


def write_toml(path: Path, raw: dict[str, Any]) -> None:
    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, body in raw.items():
        if not isinstance(body, dict):
            continue
        if section == "targets":
            for tid, t in body.items():
                lines.append(f"[targets.{tid}]")
                lines += [f"{k} = {value(v)}" for k, v in t.items() if not isinstance(v, dict)]
                for k, sub in t.items():
                    if isinstance(sub, dict):  # e.g. [targets.main.encryption]
                        lines.append(f"[targets.{tid}.{k}]")
                        lines += [f"{sk} = {value(sv)}" for sk, sv in sub.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")


async def worker_process(tmp_path: Path, prefix: str, pg_db: str | None,
                         targets: dict[str, Any] | None = None,
                         env: dict[str, str] | None = None,
                         **worker: Any) -> asyncio.subprocess.Process:
    """`safehold worker` as a real child process, on this test's prefix and database (or
    on `targets`, with `env` for their passwords)."""
    cfg = tmp_path / "safehold.toml"
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db, **worker)
    if targets is not None:
        raw["targets"] = targets
    write_toml(cfg, raw)
    env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD, **(env or {})}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "--config", str(cfg), "worker", cwd=REPO, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def backup(api: Any, **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/v1/targets/main/backups?wait=60", json=body)
    job = await resp.json()
    assert resp.status == 200, job
    assert job["status"] == "succeeded", job
    return job


async def read_events(resp: Any, until: Any = None) -> list[dict[str, Any]]:
    """Parse an SSE body into events (with their ids) until it ends or `until(event)`."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("id:"):
            current["id"] = line[3:].strip()
        elif line.startswith("event:"):
            current["event"] = line[6:].strip()
        elif line.startswith("data:"):
            current["data"] = json.loads(line[5:].strip())
        elif line == "" and "data" in current:
            events.append(current)
            current = {}
            if until is not None and until(events[-1]):
                break
    return events


def form(data: bytes, filename: str = "my_backup.sql.gz") -> aiohttp.FormData:
    """A multipart upload body with the file in field `file`."""
    f = aiohttp.FormData()
    f.add_field("file", io.BytesIO(data), filename=filename, content_type="application/gzip")
    return f


async def restore(api: Any, name: str, *, target: str = "main", wait: float = 180,
                  **body: Any) -> dict[str, Any]:
    """Restore `name` through the API and return the finished job."""
    job: dict[str, Any] = await (await api.post(
        f"/api/v1/targets/{target}/restores?wait={wait:g}",
        json={"backup": name, **body})).json()
    return job


async def restore_twice_unchanged(api: Any, name: str, fingerprint: Any,
                                  before: Any) -> None:
    """Restore `name` over the live database twice; `fingerprint()` must equal `before`."""
    for attempt in (1, 2):
        job = await restore(api, name)
        assert job["status"] == "succeeded", (attempt, job)
        assert await fingerprint() == before, attempt


def gzip_bomb(head: bytes, zeros: int, tail: bytes) -> bytes:
    """head + `zeros` NUL-free filler + tail, gzip-compressed in a stream (never in memory)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(head)]
    # 1 MiB of SQL comment lines (`-- ` and dashes: a comment to PostgreSQL, the mysql
    # client and the MySQL server alike): compresses like zeros
    block = (b"-- " + b"-" * 1020 + b"\n") * 1024
    for _ in range(zeros >> 20):
        out.append(c.compress(block))
    out.append(c.compress(b"\n" + tail))
    out.append(c.flush())
    return b"".join(out)


async def publish_bomb(storage_dir: Path, name: str, head: bytes, tail: bytes,
                       like: dict[str, Any], size: int = 512 << 20) -> None:
    """Store a gzip bomb by hand, its manifest silent about the plain size (as a file copied
    into storage with a hand-written manifest would be)."""
    blob = await asyncio.to_thread(gzip_bomb, head, size, tail)
    (storage_dir / name).write_bytes(blob)
    manifest = {**named_like(like, name), "sha256": hashlib.sha256(blob).hexdigest(),
                "size_bytes": len(blob)}
    manifest.pop("raw_bytes", None)
    (storage_dir / f"{name}.json").write_text(json.dumps(manifest))


@asynccontextmanager
async def running_worker(settings: Any) -> AsyncIterator[None]:
    """A real arq worker on `settings` (its own config) for the duration of the block."""
    from worker.main import build_worker, stop_gracefully

    w = build_worker(settings, poll_delay=0.05)
    task = asyncio.create_task(w.main())
    try:
        yield
    finally:
        await stop_gracefully(w, 10, task)


def republish(directory: Path, name: str, forged: bytes) -> None:
    """Replace a stored (gzip) backup with `forged` and redo its manifest's checksums: a
    backup that every checksum vouches for, and that is still wrong."""
    blob = gzip.compress(forged)
    (directory / name).write_bytes(blob)
    manifest = json.loads((directory / f"{name}.json").read_text())
    manifest.update(sha256=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob),
                    raw_bytes=len(forged))
    (directory / f"{name}.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------- the storage seam
# Tests read what a backup stored through shared.storage.local (the code the service itself
# reads with), never by knowing where a file or its manifest lies: a layout change stays
# in one place. (Tests that plant hostile files by hand do that on purpose.)
def _store(storage_dir: Path) -> tuple[Any, str]:
    from shared.storage.local import LocalStorage

    return LocalStorage(storage_dir.parent), storage_dir.name


async def stored_manifest(storage_dir: Path, name: str) -> dict[str, Any]:
    store, target = _store(storage_dir)
    return await store.read_manifest(target, name)


async def stored_bytes(storage_dir: Path, name: str) -> bytes:
    store, target = _store(storage_dir)
    return b"".join([block async for block in store.open(target, name)])


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(section: str) -> list[str]:
    """The ```sh blocks of the README section titled `section` (its `## ` heading)."""
    text = README.read_text().split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return [str(b) for b in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)]


async def run_recipe(script: str, cwd: Path, env: dict[str, str]) -> str:
    """A README recipe run as pasted (`sh -e`); its output, after asserting it succeeded."""
    done = await asyncio.create_subprocess_exec(
        "sh", "-c", "set -e\n" + script, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await done.communicate())[0].decode()
    assert done.returncode == 0, out
    return out
