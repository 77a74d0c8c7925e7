"""Shared pieces of the benchmarks: run Safehold's API and worker as real processes, time
shell pipelines, sample the worker's peak RSS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def sh(cmd: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of a bash pipeline (pipefail on)."""
    t0 = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env)
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeakRSS(threading.Thread):
    """Follows a process's VmHWM (peak resident set) until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except FileNotFoundError:
                return
            time.sleep(0.2)


class Safehold:
    """`safehold api` + `safehold worker` on a config; submit jobs and wait for them."""

    def __init__(self, config: Path, env: dict[str, str], token: str, base: str,
                 worker_pid: int) -> None:
        self.config, self.env, self.token, self.base = config, env, token, base
        self.rss = PeakRSS(worker_pid)
        self.api_pid = 0
        self.prefix = ""
        self.workers: list[subprocess.Popen[bytes]] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode() if body is not None else None,
            method=method, headers={"Content-Type": "application/json",
                                    "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=7200) as resp:
            return json.loads(resp.read())

    def job(self, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        t0 = time.monotonic()
        job = self.call("POST", f"{path}?wait=3600", body)
        took = time.monotonic() - t0
        assert job["status"] == "succeeded", job
        return took, job


def copy_backup(work: Path, name: str, src: str, dst: str) -> None:
    """Make a backup of target `src` restorable into target `dst` (file + manifest)."""
    import shutil

    target_dir = work / "backups" / dst
    target_dir.mkdir(parents=True, exist_ok=True)
    for f in (name, f"{name}.json"):
        shutil.copy(work / "backups" / src / f, target_dir / f)


@contextmanager
def safehold(work: Path, targets_toml: str, env: dict[str, str] | None = None,
             workers: int = 1) -> Iterator[Safehold]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = work / "safehold.toml"
    cfg.write_text(f"""
[server]
port = {port}
[redis]
prefix = "safehold-bench-{os.getpid()}"
[storage]
path = "{work / 'backups'}"
[auth]
dev_key_path = "{work / 'dev-key.pem'}"
{targets_toml}
""")
    env = {**os.environ, **(env or {})}
    cli = [sys.executable, "-m", "api.cli", "--config", str(cfg)]
    token = subprocess.run([*cli, "token", "--role", "admin", "--ttl", "4h"], cwd=REPO,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    api = subprocess.Popen([*cli, "api"], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen([*cli, "worker"], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
             for _ in range(workers)]
    worker = procs[0]
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        s = Safehold(cfg, env, token, base, worker.pid)
        s.api_pid, s.workers, s.prefix = api.pid, procs, f"safehold-bench-{os.getpid()}"
        s.rss.start()
        yield s
    finally:
        api.terminate()
        for w in procs:
            w.terminate()
        api.wait()
        for w in procs:
            w.wait()


RESULT_MARK = "BENCH-RESULT "


def report(bench: str, figures: dict[str, Any],
           goal: dict[str, tuple[str, float]] | None = None) -> None:
    """One machine-readable line of a bench's figures (bench/all.py collects them into one
    table); `goal` names figures with a bound, e.g. {"p99_ms": ("<", 25)}."""
    print(RESULT_MARK + json.dumps({"bench": bench, "figures": figures,
                                    "goal": {k: list(v) for k, v in (goal or {}).items()}}),
          flush=True)
