"""A full disk (storage on a 3 MiB tmpfs): a backup fails cleanly as `storage_full` — no
partial file, nothing listed, the older backup untouched — and an upload answers 507."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from shared.config import parse_settings
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import running_worker


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_fails_the_backup_cleanly_and_uploads_answer_507(
        aiohttp_client: Any, redis: Any, prefix: str, small_disk: Path, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    storage = small_disk / "backups"
    settings = parse_settings(make_raw_config(prefix, storage, pg_db), test_env,
                              base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    await pg.load_rich(pg_db)
    async with running_worker(settings):
        first = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
        assert first["status"] == "succeeded", first
        name = first["result"]["filename"]
        kept = hashlib.sha256((storage / "main" / name).read_bytes()).hexdigest()
        conn = await pg.user_conn(pg_db)  # 12 MB of random hex: ~6 MB once gzipped
        await conn.execute(
            "CREATE TABLE noise AS SELECT g, (SELECT string_agg(md5(random()::text || "
            "g::text || s::text), '') FROM generate_series(1, 32) s) AS b "
            "FROM generate_series(1, 12000) g")
        await conn.close()
        job = await (await api.post("/api/v1/targets/main/backups?wait=120")).json()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "storage_full", job["error"]
    listed = [b["filename"] for b in
              (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]]
    assert listed == [name]
    leftovers = [p for p in storage.rglob("*") if p.is_file()
                 and p.name not in (name, f"{name}.json")]
    assert leftovers == []
    assert hashlib.sha256((storage / "main" / name).read_bytes()).hexdigest() == kept

    upload = await api.post("/api/v1/targets/main/uploads", data=io.BytesIO(os.urandom(5 << 20)),
                            headers={"Content-Type": "application/octet-stream"})
    assert upload.status == 507, await upload.text()
    assert (await upload.json())["error"]["code"] == "storage_full"
    assert [p for p in storage.rglob("*") if p.is_file()
            and p.name not in (name, f"{name}.json")] == []
