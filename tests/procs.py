"""Find and inspect real child processes of Safehold through /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path


def find(program: str, env_match: dict[str, str]) -> list[int]:
    """Pids of `program` whose environment contains every item of `env_match`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv or os.path.basename(argv[0].decode(errors="replace")) != program:
                continue
            env = dict(item.split(b"=", 1) for item in
                       (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if all(env.get(k.encode()) == v.encode() for k, v in env_match.items()):
            pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()
