#!/usr/bin/env python3
"""Benchmark: Safehold vs the shell pipelines an operator would write (PostgreSQL).

Generates a database of about --size-mb (pgbench tables plus a text-heavy table), then in
one run times:
  1. pg_dump > /dev/null                   (the ceiling: bare dump throughput)
  2. pg_dump | gzip -6 > f                  (what most cron scripts do)
  3. a Safehold backup through the API     (separate `safehold api` and `safehold worker`)
  4. gunzip -c f | psql --single-transaction into an empty database
  5. a Safehold restore of its backup into an empty database (no safety backup: the
     database is empty, so this measures the load path)
and prints ratios plus the worker's peak RSS. Nothing here is a test; run it by hand:

    uv run python bench/pg_backup.py --size-mb 200
    uv run python bench/pg_backup.py --size-mb 2000 --keep   # reuse the database next time
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_backup, report, safehold, sh  # noqa: E402

PG = ["-h", "127.0.0.1", "-U", "postgres"]


def psql(db: str, sql: str) -> str:
    return subprocess.run(["psql", *PG, "-X", "-tA", "-d", db, "-c", sql], check=True,
                          capture_output=True, text=True).stdout.strip()


def db_size(db: str) -> int:
    return int(psql(db, "SELECT pg_database_size(current_database())"))


def generate(db: str, size_mb: int) -> None:
    exists = psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{db}'")
    if exists and db_size(db) > size_mb * 0.8 * 2**20:
        print(f"reusing {db} ({db_size(db) / 2**20:.0f} MB)")
        return
    subprocess.run(["dropdb", *PG, "--if-exists", db], check=True)
    subprocess.run(["createdb", *PG, db], check=True)
    scale = max(1, int(size_mb * 0.6 / 15))  # pgbench: ~15 MB per scale unit
    print(f"generating {db}: pgbench -i -s {scale} + text table …", flush=True)
    subprocess.run(["pgbench", *PG, "-i", "-q", "-s", str(scale), db], check=True,
                   capture_output=True)
    text_rows = int(size_mb * 0.4 * 2**20 / 700)
    psql(db, f"""CREATE TABLE docs AS
        SELECT g AS id, now() - g * interval '1 minute' AS at,
               (SELECT string_agg(md5(random()::text || s.i), ' ')
                FROM generate_series(1, 12) AS s(i) WHERE g > 0)
               || ' lorem ipsum dolor sit amet, consectetur adipiscing elit ' || g AS body,
               jsonb_build_object('n', g, 'tag', 'tag' || (g % 100)) AS meta
        FROM generate_series(1, {text_rows}) g""")
    psql(db, "VACUUM ANALYZE")
    print(f"generated {db_size(db) / 2**20:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--db", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated database")
    args = ap.parse_args()
    db = args.db or f"safehold_bench_{args.size_mb}"
    generate(db, args.size_mb)
    size = db_size(db)
    work = Path(tempfile.mkdtemp(prefix="safehold-bench-"))
    results: dict[str, float] = {}
    restore_db = f"{db}_restore"
    try:
        dump = f"pg_dump {' '.join(PG)} {db}"
        sh(f"{dump} > /dev/null")  # warm the cache once
        results["pg_dump > /dev/null"] = sh(f"{dump} > /dev/null")
        gz = work / "shell.sql.gz"
        results["pg_dump | gzip -6"] = sh(f"{dump} | gzip -6 > {gz}")
        targets = f"""
[targets.bench]
engine = "postgresql"
url = "postgresql://postgres@127.0.0.1:5432/{db}"
[targets.restore]
engine = "postgresql"
url = "postgresql://postgres@127.0.0.1:5432/{restore_db}"
"""
        with safehold(work, targets) as app:
            time.sleep(0.5)
            idle_rss = app.rss.peak
            results["safehold backup"], job = app.job("/api/v1/targets/bench/backups", {})
            name, backup_bytes = job["result"]["filename"], job["result"]["size_bytes"]
            time.sleep(0.3)
            backup_rss = app.rss.peak
            for target_db in (restore_db, f"{db}_shell"):
                subprocess.run(["dropdb", *PG, "--if-exists", target_db], check=True)
                subprocess.run(["createdb", *PG, target_db], check=True)
            results["gunzip -c | psql"] = sh(
                f"gunzip -c {gz} | psql {' '.join(PG)} -X -q -v ON_ERROR_STOP=1 "
                f"--single-transaction -d {db}_shell > /dev/null")
            copy_backup(work, name, "bench", "restore")
            results["safehold restore"], _ = app.job(
                "/api/v1/targets/restore/restores",
                {"backup": name, "create_safety_backup": False})
            app.rss.stop.set()
            peak_rss = app.rss.peak
        for target_db in (restore_db, f"{db}_shell"):
            subprocess.run(["dropdb", *PG, "--if-exists", target_db], check=True)
        gz_bytes = gz.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            subprocess.run(["dropdb", *PG, "--if-exists", db], check=True)

    print(f"\ndatabase {size / 2**20:.0f} MB")
    for k, v in results.items():
        print(f"  {k:<24} {v:7.2f} s")
    bare, gzip_t = results["pg_dump > /dev/null"], results["pg_dump | gzip -6"]
    ours = results["safehold backup"]
    print(f"backup throughput vs bare pg_dump : {bare / ours:.2f}x  (target >= 0.9)")
    print(f"backup speed vs pg_dump | gzip -6 : {gzip_t / ours:.2f}x")
    print(f"output size vs gzip -6            : {backup_bytes / gz_bytes:.3f}  "
          f"({backup_bytes / 2**20:.1f} MB vs {gz_bytes / 2**20:.1f} MB)")
    print(f"restore vs gunzip -c | psql       : "
          f"{results['gunzip -c | psql'] / results['safehold restore']:.2f}x  (target >= 0.95)")
    print(f"worker RSS idle / peak in backup / peak in restore: {idle_rss / 2**20:.0f} / "
          f"{backup_rss / 2**20:.0f} / {peak_rss / 2**20:.0f} MB  (target < 150)")
    report(f"pg_backup {size / 2**20:.0f} MB", {
        "backup_vs_pg_dump": round(bare / ours, 2), "backup_vs_pg_dump_gzip": round(
            gzip_t / ours, 2), "size_vs_gzip6": round(backup_bytes / gz_bytes, 3),
        "restore_vs_psql": round(results["gunzip -c | psql"] / results["safehold restore"], 2),
        "worker_peak_rss_mib": round(max(backup_rss, peak_rss) / 2**20)},
        goal={"backup_vs_pg_dump": (">=", 0.9), "restore_vs_psql": (">=", 0.95),
              "worker_peak_rss_mib": ("<", 150)})


if __name__ == "__main__":
    main()
