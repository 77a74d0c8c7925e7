#!/usr/bin/env python3
"""Live events to many followers: N clients (each its own subject) follow the global SSE
stream of one API process while jobs are submitted; reports the delay from sending a
submit to each client receiving that job's `queued` event (p50/p99), the API's peak RSS,
and the submit latency (p50/p99) meanwhile. `--clients 0` gives the baseline submit
latency. Clients and server share this machine's cores.

    uv run python bench/sse_fanout.py --clients 1000 --jobs 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

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
            line = raw.decode().strip()
            if line.startswith("data:"):
                doc = json.loads(line[5:])
                if doc.get("type") == "queued":
                    seen.setdefault(f"{doc['job']}/{id(resp)}", time.monotonic())


async def run(base: str, tokens: list[str], admin: str, jobs: int) -> dict[str, float]:
    seen: dict[str, float] = {}
    ready = asyncio.Event()
    count = [0, len(tokens)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=30)) as session:
        tasks = [asyncio.create_task(follower(session, f"{base}/api/v1/events", t, seen,
                                              ready, count)) for t in tokens]
        if tokens:
            await asyncio.wait_for(ready.wait(), 120)
        submitted: dict[str, float] = {}
        submit_ms: list[float] = []
        for _ in range(jobs):
            t0 = time.monotonic()
            async with session.post(f"{base}/api/v1/targets/example/backups",
                                    headers={"Authorization": f"Bearer {admin}"}) as r:
                job = await r.json()
            submitted[job["id"]] = t0  # the event is published before the answer
            submit_ms.append((time.monotonic() - t0) * 1000)
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    delays = [max(0.0, at - submitted[key.split("/")[0]]) * 1000
              for key, at in seen.items() if key.split("/")[0] in submitted]
    expected = jobs * len(tokens)
    q = statistics.quantiles(delays, n=100) if len(delays) > 1 else [0.0] * 99
    sq = statistics.quantiles(submit_ms, n=100) if len(submit_ms) > 1 else [0.0] * 99
    print(f"followers {len(tokens)}, jobs {jobs}: {len(delays)}/{expected} deliveries; "
          f"delay p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms; submit p50 {sq[49]:.1f} ms, "
          f"p99 {sq[98]:.1f} ms")
    return {"followers": len(tokens), "delivered": len(delays), "expected": expected,
            "delay_p50_ms": round(q[49]), "delay_p99_ms": round(q[98]),
            "submit_p50_ms": round(sq[49], 1), "submit_p99_ms": round(sq[98], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=20)
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
        figures = asyncio.run(run(s.base, tokens, s.token, a.jobs))
        rss.stop.set()
        print(f"API peak RSS {rss.peak / 2**20:.0f} MiB")
    report("sse_fanout", {**figures, "api_peak_rss_mib": round(rss.peak / 2**20)},
           goal={"delay_p99_ms": ("<", 500)})


if __name__ == "__main__":
    main()
