#!/usr/bin/env python3
"""Scale-out on one queue: 100 backups of 10 targets drained by 1, 2 and 4 worker
processes sharing one Redis and one storage; then 4 workers with one SIGKILLed mid-run.

    uv run python bench/scale_out.py [--jobs 100] [--targets 10] [--mb 20] [--netns]

Checks, every run: every job ends once (none lost, none twice), each target holds exactly
its jobs' backups with distinct names, no two jobs of one target ran at the same time (the
per-target lock); with a worker killed, its jobs end `worker_lost` and all others succeed.
Prints throughput (jobs/s) per worker count and the ratio to one worker.

`--netns` (root, `ip netns`): each worker runs in a network namespace of its own, as on a
host of its own, reaching a private Redis over a veth pair (10.201.N.2 -> 10.201.N.1) — no
loopback shared with the API or the other workers. The SQLite targets and the storage
directory stay on this machine's filesystem (a namespace has its own network, not its own
disk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, free_port, report  # noqa: E402


def make_db(path: Path, mb: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    rows = mb * 1024 // 4
    conn.executemany("INSERT INTO t (body) VALUES (?)",
                     ((os.urandom(2048) + b"x" * 2048,) for _ in range(rows)))
    conn.commit()
    conn.close()


def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True)


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[tuple[str, str]]]:
    """`count` network namespaces, each joined to this one by a veth pair; yields
    (namespace, the host side's address). Removed afterwards, whatever happens."""
    made: list[tuple[str, str]] = []
    try:
        for n in range(1, count + 1):
            ns, host, peer = f"shbench{n}", f"shbh{n}", f"shbn{n}"
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
            ip("netns", "add", ns)
            made.append((ns, f"10.201.{n}.1"))
            ip("link", "add", host, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("addr", "add", f"10.201.{n}.1/30", "dev", host)
            ip("link", "set", host, "up")
            ip("addr", "add", f"10.201.{n}.2/30", "dev", peer, ns=ns)
            ip("link", "set", peer, "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
        yield made
    finally:
        for ns, _ in made:  # deleting a namespace deletes its end of the pair, and the pair
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def call(base: str, token: str, method: str, path: str) -> Any:
    req = urllib.request.Request(base + path, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        data=b"{}" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def run(work: Path, targets: int, jobs: int, workers: int, kill_one: bool,
        nets: list[tuple[str, str]] | None = None, redis_port: int = 6379) -> dict[str, Any]:
    port = free_port()
    prefix = f"bench-scale-{os.getpid()}-{workers}-{int(kill_one)}"
    cfg = work / f"safehold-{workers}-{int(kill_one)}.toml"
    storage = work / f"backups-{workers}-{int(kill_one)}"
    lines = [f"[server]\nport = {port}",
             f'[redis]\nprefix = "{prefix}"\nurl = "redis://127.0.0.1:{redis_port}/0"',
             f'[storage]\npath = "{storage}"', f'[auth]\ndev_key_path = "{work}/key.pem"',
             "[worker]\norphan_after = 6.0\nheartbeat_interval = 1.0\nmax_jobs = 2"]
    for i in range(targets):
        lines.append(f'[targets.t{i}]\nengine = "sqlite"\npath = "{work}/db{i}.db"')
    cfg.write_text("\n".join(lines) + "\n")
    cli = [sys.executable, "-m", "api.cli", "--config", str(cfg)]
    env = dict(os.environ)
    token = subprocess.run([*cli, "token", "--role", "admin", "--ttl", "2h"], cwd=REPO,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    api = subprocess.Popen([*cli, "api"], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    procs = []
    for n in range(workers):
        if nets:  # its own network stack: Redis only through its veth pair
            ns, host_ip = nets[n]
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, *cli, "worker"], cwd=REPO, stderr=subprocess.DEVNULL,
                env={**env, "SAFEHOLD_REDIS_URL": f"redis://{host_ip}:{redis_port}/0"}))
        else:
            procs.append(subprocess.Popen([*cli, "worker"], cwd=REPO, env=env,
                                          stderr=subprocess.DEVNULL))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                ready = call(base, token, "GET", "/readyz")
                if ready.get("checks", {}).get("workers") == workers:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        t0 = time.monotonic()
        ids = [call(base, token, "POST", f"/api/v1/targets/t{n % targets}/backups")["id"]
               for n in range(jobs)]
        killed = False
        while True:
            listed = call(base, token, "GET", f"/api/v1/jobs?kind=backup&limit={jobs + 10}")
            done = [j for j in listed["jobs"] if j["status"] in ("succeeded", "failed")]
            if kill_one and not killed and len(done) >= jobs // 4:
                procs[0].send_signal(signal.SIGKILL)  # as the OOM killer does
                killed = True
            if len(done) == jobs:
                break
            time.sleep(0.25)
        took = time.monotonic() - t0
        jobs_now = {j["id"]: j for j in listed["jobs"]}
        assert set(jobs_now) == set(ids), "lost or extra jobs"
        ok = [j for j in jobs_now.values() if j["status"] == "succeeded"]
        lost = [j for j in jobs_now.values() if j["status"] == "failed"]
        assert all(j["error"]["code"] in ("worker_lost", "interrupted") for j in lost), \
            [j["error"] for j in lost]
        if not kill_one:
            assert not lost, [j["error"] for j in lost]
        # each target: exactly its succeeded jobs' backups, distinct names
        for i in range(targets):
            listed_b = call(base, token, "GET", f"/api/v1/targets/t{i}/backups")["backups"]
            names = [b["filename"] for b in listed_b]
            mine = [j for j in ok if j["target"] == f"t{i}"]
            assert len(names) == len(set(names)) == len(mine), (i, len(names), len(mine))
            # each backup's own span (from after its target lock to its manifest): a job's
            # started_at also counts its wait for the lock
            spans = sorted((datetime.fromisoformat(b["created_at"].replace("Z", "+00:00")),
                            datetime.fromisoformat(b["finished_at"].replace("Z", "+00:00")))
                           for b in listed_b)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), \
                f"two jobs of t{i} overlapped"
        return {"workers": workers, "killed": kill_one, "seconds": round(took, 2),
                "jobs_per_s": round(len(ok) / took, 2), "succeeded": len(ok),
                "worker_lost": len(lost)}
    finally:
        for p in [api, *procs]:
            if p.poll() is None:
                p.terminate()
        for p in [api, *procs]:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--mb", type=int, default=20, help="size of each SQLite database")
    ap.add_argument("--netns", action="store_true",
                    help="each worker in a network namespace of its own (root, ip netns)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    for i in range(a.targets):
        make_db(work / f"db{i}.db", a.mb)
    with contextlib.ExitStack() as stack:
        nets, redis_port = None, 6379
        if a.netns:
            nets = stack.enter_context(namespaces(4))
            redis_port = free_port()  # a Redis of the bench's own, on every veth address
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly",
                 "no", "--protected-mode", "no", "--bind", "127.0.0.1",
                 *[host_ip for _, host_ip in nets]], stdout=subprocess.DEVNULL)
            stack.callback(redis.wait)
            stack.callback(redis.terminate)
            time.sleep(0.5)
        results = [run(work, a.targets, a.jobs, n, False, nets, redis_port) for n in (1, 2, 4)]
        results.append(run(work, a.targets, a.jobs, 4, True, nets, redis_port))
    one = results[0]["jobs_per_s"]
    print(f"{'workers':>8} {'killed':>7} {'seconds':>8} {'jobs/s':>7} {'vs 1':>5} "
          f"{'ok':>4} {'lost':>5}")
    for r in results:
        print(f"{r['workers']:>8} {str(r['killed']):>7} {r['seconds']:>8} "
              f"{r['jobs_per_s']:>7} {r['jobs_per_s'] / one:>5.2f} {r['succeeded']:>4} "
              f"{r['worker_lost']:>5}")
    by = {(r["workers"], r["killed"]): r for r in results}
    report(f"scale_out {a.jobs} jobs{' netns' if a.netns else ''}", {
        "jobs_per_s_1": one, "speedup_2": round(by[(2, False)]["jobs_per_s"] / one, 2),
        "speedup_4": round(by[(4, False)]["jobs_per_s"] / one, 2),
        "killed_run_lost": by[(4, True)]["worker_lost"],
        "killed_run_ok": by[(4, True)]["succeeded"]})


if __name__ == "__main__":
    main()
