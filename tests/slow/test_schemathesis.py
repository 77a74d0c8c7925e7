"""schemathesis against the running API's own OpenAPI document, with a token of each role
and with none: zero 5xx, every answer matching its documented status, content type and
schema, schema-valid requests accepted and schema-violating ones refused (the seed surface
included). Bounded (tests/fuzz/schemathesis.toml) so it runs in CI on every change."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DEV_KEY, REDIS_URL
from tests.helpers import write_toml
from tests.slow.test_cli import REPO, cli, free_port, wait_ready

CONFIG = REPO / "tests" / "fuzz" / "schemathesis.toml"


async def schemathesis(base: str, cfg: Path, token: str | None, *extra: str,
                       cwd: Path) -> str:
    """Run `st run` against `base`; return its output, failing the test on any finding."""
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(cfg), "run",
        f"{base}/api/v1/openapi.json", *auth, "--phases", "examples,coverage,fuzzing",
        "--no-color", "--seed", os.environ.get("SAFEHOLD_FUZZ_SEED", "1"), *extra,
        cwd=cwd,  # its .schemathesis/ cache goes there, never into the repository
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-12000:]
    passed = [int(n) for n in re.findall(r"(\d+) passed", text)]
    assert passed and all(n > 0 for n in passed), text[-3000:]  # "40 passed" is not "0"
    return text


@pytest.mark.timeout(900)  # four fuzzer runs of ~30 s each on an idle machine
async def test_fuzz_every_operation_as_each_role(prefix: str, tmp_path: Path) -> None:
    db = tmp_path / "example.db"
    with sqlite3.connect(db) as conn:
        conn.executescript("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);"
                           "INSERT INTO notes (body) VALUES ('one'), ('two');")
    port = free_port()
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, {
        "default_target": "example",
        "redis": {"url": REDIS_URL, "prefix": prefix},
        "storage": {"path": str(tmp_path / "backups")},
        "server": {"port": port, "wait_timeout": 20.0},
        "auth": {"dev_key_path": str(DEV_KEY)},
        "targets": {"example": {"engine": "sqlite", "path": str(db)}},
    })
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOLD_")}
    log = (tmp_path / "server.log").open("wb")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "--config", str(cfg), "run", cwd=tmp_path, env=env,
        stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base)
        tokens = {}
        for role in ("admin", "operator", "viewer"):
            rc, out, err = await cli("--config", str(cfg), "token", "--role", role, env=env)
            assert rc == 0, err
            tokens[role] = out.strip()
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {tokens['admin']}"}) as http:
            async with http.post(f"{base}/api/v1/targets/example/backups?wait=30") as resp:
                assert resp.status == 200  # something to list, read and download

        # the admin reaches every operation's logic on the real target; the others also
        # fuzz the target grammar itself (and meet 403/401 where their role stops)
        admin_cfg = tmp_path / "admin.toml"
        admin_cfg.write_text(CONFIG.read_text() + '\n[parameters]\n"path.target" = "example"\n')
        await schemathesis(base, admin_cfg, tokens["admin"], cwd=tmp_path)
        await schemathesis(base, CONFIG, tokens["operator"], "--max-examples", "10",
                          cwd=tmp_path)
        await schemathesis(base, CONFIG, tokens["viewer"], "--max-examples", "10",
                          cwd=tmp_path)
        await schemathesis(base, CONFIG, None, "--max-examples", "5", cwd=tmp_path)
        assert server.returncode is None, "the server died under the fuzzer"
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
        log.close()
    logged = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in logged and " ERROR " not in logged, "\n".join(
        line for line in logged.splitlines() if "safehold.audit" not in line)[-6000:]
