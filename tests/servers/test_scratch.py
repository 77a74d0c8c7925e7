"""Issue 20.9: the plaintext a SQLite backup puts on the worker's disk (its snapshot, even
when the backup is encrypted) lives in Safehold's private temp space — a 0700 directory
of this user, the file 0600 — and what a SIGKILLed worker leaves there is swept."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

import pyrage

from api.app import create_app
from shared.config import parse_settings
from tests.conftest import bearer, make_raw_config
from tests.helpers import REPO, wait_for, wait_for_terminal, write_toml


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_a_sqlite_snapshot_is_private_and_swept_after_a_kill(
        aiohttp_client: Any, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE secrets (id INTEGER PRIMARY KEY, v TEXT)")
        conn.executemany("INSERT INTO secrets (v) VALUES (?)", [("card 4111",)] * 1000)
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    raw["targets"] = {"main": {"engine": "sqlite", "path": str(db),
                               "encryption": {"recipients": [recipient]}}}
    write_toml(cfg := tmp_path / "safehold.toml", raw)
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}

    async def start_worker() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "--config", str(cfg), "worker", cwd=REPO,
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    worker = await start_worker()
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # the snapshot waits on it: caught mid-backup
        job_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
        root = tmp / f"safehold-{os.geteuid()}"
        snaps = await wait_for(lambda: list(root.glob("sqlite-*/snapshot.db")), 30,
                               "the snapshot file")
        assert mode(root) == 0o700 and mode(snaps[0].parent) == 0o700
        assert mode(snaps[0]) == 0o600
        assert not list(tmp.glob("safehold-sqlite-*"))  # the old, shared-/tmp place
        worker.kill()  # as the OOM killer does
        await worker.wait()
        assert snaps[0].exists()  # left behind: nothing of the worker ran on
        holder.execute("ROLLBACK")
        worker = await start_worker()  # a worker on this host sweeps it
        await wait_for(lambda: not snaps[0].parent.exists(), 30, "the sweep")
        lost = await wait_for_terminal(api, job_id, timeout=60)
        assert lost["error"]["code"] == "worker_lost"
        job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
        assert job["status"] == "succeeded", job
        assert list(root.iterdir()) == []  # a finished backup leaves nothing
    finally:
        holder.close()
        if worker.returncode is None:
            worker.terminate()
            await worker.wait()


