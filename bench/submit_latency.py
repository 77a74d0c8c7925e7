#!/usr/bin/env python3
"""Submit latency under load: POST /api/v1/targets/{t}/backups at a fixed rate (open loop:
each request is timed from the moment it was due, so a slow answer delays nobody's clock)
while the worker is busy with the jobs it queues. Reports p50/p99/max of the API's answer
and, beside it in the same run, the same at a rate of 5 req/s (the idle baseline).

    uv run python bench/submit_latency.py --rate 300 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import PeakRSS, report, safehold  # noqa: E402


async def load(base: str, token: str, rate: float, seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of `rate` submits per second for `seconds`; the count of non-202s."""
    latencies: list[float] = []
    bad = [0]
    conn = aiohttp.TCPConnector(limit=256)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=conn, headers=headers) as session:

        async def one(due: float) -> None:
            async with session.post(f"{base}/api/v1/targets/busy/backups") as resp:
                await resp.read()
                if resp.status != 202:
                    bad[0] += 1
            latencies.append((time.monotonic() - due) * 1000)

        start = time.monotonic() + 0.2
        tasks = []
        for i in range(int(rate * seconds)):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    return latencies, bad[0]


def quantiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[98], max(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=300)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--mb", type=int, default=20, help="size of the busy SQLite database")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    db = work / "busy.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)",
                         ((f"{i:08d}" * 128,) for i in range(a.mb * 1024)))
    with safehold(work, f'[targets.busy]\nengine = "sqlite"\npath = "{db}"\n') as s:
        rss = PeakRSS(s.api_pid)
        rss.start()
        idle, _ = asyncio.run(load(s.base, s.token, 5, 4))
        busy, bad = asyncio.run(load(s.base, s.token, a.rate, a.seconds))
        rss.stop.set()
        jobs = s.call("GET", "/api/v1/jobs?target=busy&status=succeeded&limit=1000")["count"]
    i50, i99, imax = quantiles(idle)
    b50, b99, bmax = quantiles(busy)
    print(f"idle (5 req/s):      p50 {i50:6.1f} ms  p99 {i99:6.1f} ms  max {imax:6.1f} ms")
    print(f"busy ({a.rate:g} req/s): p50 {b50:6.1f} ms  p99 {b99:6.1f} ms  max {bmax:6.1f} ms"
          f"  ({len(busy)} submits, {bad} not 202, {jobs} backups done meanwhile)")
    print(f"API peak RSS {rss.peak / 2**20:.0f} MiB   (goal: p99 < 25 ms at 300 req/s)")
    report("submit_latency", {"rate": a.rate, "p50_ms": round(b50, 1), "p99_ms": round(b99, 1),
                              "idle_p99_ms": round(i99, 1), "not_202": bad,
                              "api_peak_rss_mib": round(rss.peak / 2**20)},
           goal={"p99_ms": ("<", 25)})


if __name__ == "__main__":
    main()
