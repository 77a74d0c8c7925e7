#!/usr/bin/env python3
"""Codecs and destinations, in one run on one database: local gzip (the default) vs zstd vs
gzip+age vs two local disks vs local+S3 fan-out vs S3 alone (SeaweedFS on this machine), as
throughput ratios against local gzip, plus the worker's peak RSS during each, and the shell
pipeline an operator would write.

    uv run python bench/storage.py --size-mb 1000

Reuses bench/pg_backup.py's generated database (`--keep` there keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import safehold, sh  # noqa: E402
from pg_backup import PG, generate  # noqa: E402

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1000)
    ap.add_argument("--db", default="safehold_bench")
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    generate(a.db, a.size_mb)
    import pyrage

    from tests import s3server

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    server = s3server.start(work / "s3")
    asyncio.run(s3server.make_bucket(server, "bench-backups"))
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    url = f"postgresql://postgres@127.0.0.1:5432/{a.db}"
    targets = f"""
[storage.second]
type = "local"
path = "{work / 'second-disk'}"
[storage.offsite]
type = "s3"
endpoint = "{server.endpoint}"
bucket = "bench-backups"
prefix = "bench"
[targets.gzip]
engine = "postgresql"
url = "{url}"
[targets.zstd]
engine = "postgresql"
url = "{url}"
compression = "zstd"
[targets.age]
engine = "postgresql"
url = "{url}"
[targets.age.encryption]
recipients = ["{recipient}"]
[targets.twolocal]
engine = "postgresql"
url = "{url}"
destinations = ["local", "second"]
[targets.fanout]
engine = "postgresql"
url = "{url}"
destinations = ["local", "offsite"]
[targets.s3only]
engine = "postgresql"
url = "{url}"
destinations = ["offsite"]
"""
    env = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    pg_env = {**os.environ, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    shell = min(sh(f"pg_dump {' '.join(PG)} -d {a.db} | gzip -1 > {work}/shell.sql.gz",
                   pg_env) for _ in range(a.runs))
    rows = {}
    try:
        with safehold(work / "safehold", targets, env) as s:
            for target in ("gzip", "zstd", "age", "twolocal", "fanout", "s3only"):
                best, peak, stored = float("inf"), 0, 0
                for _ in range(a.runs):
                    Path(f"/proc/{s.rss.pid}/clear_refs").write_text("5")  # reset VmHWM
                    s.rss.peak = 0
                    time.sleep(0.3)
                    took, job = s.job(f"/api/v1/targets/{target}/backups", {})
                    best = min(best, took)
                    peak = max(peak, s.rss.peak)
                    stored = job["result"]["size_bytes"]
                    raw = job["result"]["raw_bytes"]
                rows[target] = (best, peak, stored, raw)
    finally:
        server.stop()
    base = rows["gzip"][0]
    print(f"database {a.size_mb} MB; shell `pg_dump | gzip -1 > f`: {shell:.1f} s")
    print(f"{'pipeline':<22}{'wall s':>8}{'vs gzip':>9}{'vs shell':>9}{'stored MB':>11}"
          f"{'MiB/s plain':>12}{'peak RSS MiB':>14}")
    for target, (took, peak, stored, raw) in rows.items():
        label = {"gzip": "local gzip", "zstd": "local zstd", "age": "local gzip+age",
                 "twolocal": "local+local gzip", "fanout": "local+S3 gzip",
                 "s3only": "S3 only gzip"}[target]
        print(f"{label:<22}{took:>8.1f}{base / took:>9.2f}{shell / took:>9.2f}"
              f"{stored / 1e6:>11.1f}{raw / MiB / took:>12.1f}{peak / MiB:>14.0f}")


if __name__ == "__main__":
    main()
