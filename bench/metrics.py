#!/usr/bin/env python3
"""`/metrics` with many backups: a target with --backups manifests (tiny data files placed by
hand), the API and a worker as real processes; times the first scrape (cold: reads every
manifest) and the next ones (the cached catalog), plus /healthz under 100 concurrent scrapes.

    uv run python bench/metrics.py --backups 10000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, safehold  # noqa: E402


def scrape(url: str) -> float:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=120) as resp:
        resp.read()
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backups", type=int, default=10_000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    d = work / "safehold" / "backups" / "app"
    d.mkdir(parents=True)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    for i in range(a.backups):
        at = start + timedelta(hours=i)
        name = f"backup_sqlite_{at:%Y%m%d_%H%M%S}.db.gz"
        data = b"x" * 64
        (d / name).write_bytes(data)
        (d / f"{name}.json").write_text(json.dumps({
            "filename": name, "target": "app", "engine": "sqlite", "kind": "backup",
            "created_at": at.isoformat().replace("+00:00", "Z"), "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "codecs": [{"codec": "gzip"}]}))
    db = work / "app.db"
    db.write_bytes(b"")
    with safehold(work / "safehold", f'[targets.app]\nengine = "sqlite"\npath = "{db}"\n') as s:
        url = s.base + "/metrics"
        cold = scrape(url)
        warm = [scrape(url) for _ in range(20)]
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            scrapes = [pool.submit(scrape, url) for _ in range(100)]
            health = [scrape(s.base + "/healthz") for _ in range(5)]
            took = [f.result() for f in scrapes]
    print(f"{a.backups} backups: first scrape {cold * 1000:.0f} ms, then median "
          f"{statistics.median(warm) * 1000:.1f} ms (max {max(warm) * 1000:.1f} ms); "
          f"100 concurrent scrapes: median {statistics.median(took) * 1000:.0f} ms, "
          f"/healthz meanwhile {max(health) * 1000:.0f} ms at worst")
    report(f"metrics {a.backups} backups", {
        "warm_scrape_ms": round(statistics.median(warm) * 1000, 1),
        "concurrent_scrape_median_ms": round(statistics.median(took) * 1000),
        "healthz_worst_ms": round(max(health) * 1000)})


if __name__ == "__main__":
    main()
