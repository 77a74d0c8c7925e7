#!/usr/bin/env python3
"""Live events to many followers: N clients (each its own subject) follow the global SSE
stream of one API process while jobs are submitted; reports the delay from sending a
submit to each client receiving that job's `queued` event (p50/p99), the API's peak RSS,
and the submit latency (p50/p99) meanwhile. `--clients 0` gives the baseline submit
latency. Clients and server share this machine's cores; the followers are spread over
`--procs` processes (one process parsing 1,000 streams saturates a core by itself).

    uv run python bench/sse_fanout.py --clients 1000 --jobs 20 --procs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import PeakRSS, report, safehold  # noqa: E402


async def follower(session: aiohttp.ClientSession, url: str, token: str,
                   seen: dict[str, float], ready: asyncio.Event, count: list[int]) -> None:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, resp.status
        count[0] += 1
        if count[0] == count[1]:
            ready.set()
        async for raw in resp.content:
            if raw.startswith(b"data:"):
                doc = json.loads(raw[5:])
                if doc.get("type") == "queued":
                    seen.setdefault(f"{doc['job']}/{id(resp)}", time.monotonic())


async def follow_all(base: str, tokens: list[str], ready_q: Any, stop: Any) -> dict[str, float]:
    seen: dict[str, float] = {}
    ready = asyncio.Event()
    count = [0, len(tokens)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=30)) as session:
        tasks = [asyncio.create_task(follower(session, f"{base}/api/v1/events", t, seen,
                                              ready, count)) for t in tokens]
        await asyncio.wait_for(ready.wait(), 120)
        ready_q.put(len(tokens))
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return seen


def follower_process(base: str, tokens: list[str], ready_q: Any, stop: Any,
                     out_q: Any) -> None:
    """A share of the followers in a process of its own (CLOCK_MONOTONIC is one clock for
    every process here, so its receive times compare with the submitter's)."""
    out_q.put(asyncio.run(follow_all(base, tokens, ready_q, stop)))


async def submit(base: str, admin: str, jobs: int) -> tuple[dict[str, float], list[float]]:
    submitted: dict[str, float] = {}
    submit_ms: list[float] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(jobs):
            t0 = time.monotonic()
            async with session.post(f"{base}/api/v1/targets/example/backups",
                                    headers={"Authorization": f"Bearer {admin}"}) as r:
                job = await r.json()
            submitted[job["id"]] = t0  # the event is published before the answer
            submit_ms.append((time.monotonic() - t0) * 1000)
            await asyncio.sleep(0.5)
    return submitted, submit_ms


def run(base: str, tokens: list[str], admin: str, jobs: int, procs: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready_q, out_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [tokens[i::procs] for i in range(procs)] if tokens else []
    children = [ctx.Process(target=follower_process, args=(base, share, ready_q, stop, out_q))
                for share in shares]
    for c in children:
        c.start()
    for _ in children:
        ready_q.get(timeout=180)
    submitted, submit_ms = asyncio.run(submit(base, admin, jobs))
    time.sleep(3)
    stop.set()
    seen: dict[str, float] = {}
    for _ in children:
        seen.update(out_q.get(timeout=120))
    for c in children:
        c.join(30)
    delays = [max(0.0, at - submitted[key.split("/")[0]]) * 1000
              for key, at in seen.items() if key.split("/")[0] in submitted]
    expected = jobs * len(tokens)
    q = statistics.quantiles(delays, n=100) if len(delays) > 1 else [0.0] * 99
    sq = statistics.quantiles(submit_ms, n=100) if len(submit_ms) > 1 else [0.0] * 99
    print(f"followers {len(tokens)} in {procs} processes, jobs {jobs}: {len(delays)}/"
          f"{expected} deliveries; delay p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms; submit p50 "
          f"{sq[49]:.1f} ms, p99 {sq[98]:.1f} ms")
    return {"followers": len(tokens), "processes": procs, "delivered": len(delays),
            "expected": expected, "delay_p50_ms": round(q[49]), "delay_p99_ms": round(q[98]),
            "submit_p50_ms": round(sq[49], 1), "submit_p99_ms": round(sq[98], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--procs", type=int, default=2,
                    help="client processes the followers are spread over (one Python "
                         "process parsing 1,000 streams is itself the bottleneck)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    import sqlite3

    db = work / "example.db"
    sqlite3.connect(db).executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
    with safehold(work, f'[targets.example]\nengine = "sqlite"\npath = "{db}"\n') as s:
        from api.auth import mint_dev_token
        from shared.config import AuthSettings

        auth = AuthSettings(dev_key_path=str(work / "dev-key.pem"))
        tokens = [mint_dev_token(auth, ["viewer"], ttl=3600, subject=f"watcher-{i}")
                  for i in range(a.clients)]
        rss = PeakRSS(s.api_pid)
        rss.start()
        figures = run(s.base, tokens, s.token, a.jobs, max(1, a.procs))
        rss.stop.set()
        print(f"API peak RSS {rss.peak / 2**20:.0f} MiB")
    report("sse_fanout", {**figures, "api_peak_rss_mib": round(rss.peak / 2**20)},
           goal={"delay_p99_ms": ("<", 500)})


if __name__ == "__main__":
    main()
