"""The README runs as pasted: every ```bash block, in order, in one shell, from a copy of
the repository with no config — exactly as a newcomer would (`./scripts/run.sh &`, a
token, curl, the CLI). Blocks that are illustrations (other machines, other engines) are
```sh and are not run."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv", "backups", "data", ".standins", ".safehold*",
                              "test-artifacts", "__pycache__", ".pytest_cache", ".mypy_cache",
                              ".ruff_cache", "bench")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_shell_blocks_run_as_pasted(tmp_path: Path) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8081)) == 0:
            pytest.fail("port 8081 (the README's) is taken: stop what listens there")
    copy = tmp_path / "safehold"
    shutil.copytree(REPO, copy, ignore=SKIP)
    blocks = bash_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 3
    script = "\n".join([
        "set -euo pipefail",
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",  # the server started in the README
        *blocks])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SAFEHOLD_") and k != "VIRTUAL_ENV"}
    env["SAFEHOLD_REDIS_PREFIX"] = f"readme-{uuid.uuid4().hex[:8]}"  # not the shared default
    result = subprocess.run(["bash", "-c", script], cwd=copy, env=env, capture_output=True,
                            text=True, timeout=900)
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, f"exit {result.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    # what a newcomer sees
    assert '"status": "succeeded"' in out
    # (a second backup within the same second is named …_2: jobs start within milliseconds)
    assert re.search(r"^✓ backup backup_sqlite_\d{8}_\d{6}(_\d+)?\.db\.gz ", out, re.M)
    ids = re.findall(r"^\w{11}-\w{12}$", out, re.M)
    assert len(ids) >= 2 and ids[0] == ids[1]  # one Idempotency-Key, one job
    header = re.search(r"^x-checksum-sha256: (\w{64})", out, re.M | re.I)
    assert header and re.search(rf"^{header[1]}  backup_sqlite_", out, re.M)
    assert "event: succeeded" in out
    assert '"restore": "succeeded"' in out
    assert '"job_finished"' in out
    assert "create_restore" in out  # the audit trail
