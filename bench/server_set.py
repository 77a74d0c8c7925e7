#!/usr/bin/env python3
"""Benchmark: a server target's backup set vs the shell loop an operator would write.

Generates --databases databases of about --size-mb in total (pgbench tables), then in one
run times:
  1. { pg_dumpall --globals-only; for db: pg_dump db; } | gzip -6 > f   (the cron loop)
  2. a Safehold backup of a target with `databases = [...]` (one set, globals per member)
  3. for db: gunzip'd part | psql --single-transaction into empty databases
  4. a Safehold restore of the whole set over the live databases (no safety backup)
and prints ratios plus the worker's peak RSS. Nothing here is a test; run it by hand:

    uv run python bench/server_set.py --size-mb 400 --databases 4
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
from common import report, safehold, sh  # noqa: E402

PG = ["-h", "127.0.0.1", "-U", "postgres"]


def psql(db: str, sql: str) -> str:
    return subprocess.run(["psql", *PG, "-X", "-tA", "-d", db, "-c", sql], check=True,
                          capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=400)
    ap.add_argument("--databases", type=int, default=4)
    args = ap.parse_args()
    names = [f"safehold_setbench_{i}" for i in range(args.databases)]
    scale = max(1, int(args.size_mb / args.databases / 15))  # pgbench: ~15 MB per unit
    for db in names:
        subprocess.run(["dropdb", *PG, "--if-exists", db], check=True)
        subprocess.run(["createdb", *PG, db], check=True)
        subprocess.run(["pgbench", *PG, "-i", "-q", "-s", str(scale), db], check=True,
                       capture_output=True)
    size = sum(int(psql(db, "SELECT pg_database_size(current_database())")) for db in names)
    work = Path(tempfile.mkdtemp(prefix="safehold-setbench-"))
    results: dict[str, float] = {}
    try:
        loop = "; ".join(f"pg_dump {' '.join(PG)} {db}" for db in names)
        gz = work / "shell.sql.gz"
        sh(f"{{ pg_dumpall {' '.join(PG)} -g; {loop}; }} > /dev/null")  # warm the cache
        results["pg_dumpall -g; pg_dump… | gzip"] = sh(
            f"{{ pg_dumpall {' '.join(PG)} -g; {loop}; }} | gzip -6 > {gz}")
        for db in names:  # the shell's restore: one file per database, into empty ones
            sh(f"pg_dump {' '.join(PG)} {db} | gzip -6 > {work / db}.sql.gz")
        listed = ", ".join(f'"{db}"' for db in names)
        targets = f"""
[targets.server]
engine = "postgresql"
url = "postgresql://postgres@127.0.0.1:5432/postgres"
databases = [{listed}]
"""
        with safehold(work, targets) as app:
            time.sleep(0.5)
            results["safehold set backup"], job = app.job(
                "/api/v1/targets/server/backups", {})
            name, backup_bytes = job["result"]["filename"], job["result"]["size_bytes"]
            for db in names:
                subprocess.run(["dropdb", *PG, "--if-exists", f"{db}_shell"], check=True)
                subprocess.run(["createdb", *PG, f"{db}_shell"], check=True)
            results["gunzip | psql, per db"] = sh("; ".join(
                f"gunzip -c {work / db}.sql.gz | psql {' '.join(PG)} -X -q -v ON_ERROR_STOP=1 "
                f"--single-transaction -d {db}_shell > /dev/null" for db in names))
            results["safehold set restore"], _ = app.job(
                "/api/v1/targets/server/restores",
                {"backup": name, "create_safety_backup": False})
            app.rss.stop.set()
            peak_rss = app.rss.peak
        gz_bytes = gz.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for db in names:
            for d in (db, f"{db}_shell"):
                subprocess.run(["dropdb", *PG, "--if-exists", d], check=True)

    print(f"\n{len(names)} databases, {size / 2**20:.0f} MB")
    for k, v in results.items():
        print(f"  {k:<32} {v:7.2f} s")
    shell_b, ours_b = results["pg_dumpall -g; pg_dump… | gzip"], results["safehold set backup"]
    shell_r, ours_r = results["gunzip | psql, per db"], results["safehold set restore"]
    print(f"set backup vs the shell loop | gzip -6 : {shell_b / ours_b:.2f}x")
    print(f"set size vs gzip -6                    : {backup_bytes / gz_bytes:.3f}")
    print(f"set restore vs gunzip | psql per db    : {shell_r / ours_r:.2f}x")
    print(f"worker peak RSS                        : {peak_rss / 2**20:.0f} MB")
    report(f"server_set {len(names)} dbs {size / 2**20:.0f} MB", {
        "backup_vs_shell_loop_gzip": round(shell_b / ours_b, 2),
        "size_vs_gzip6": round(backup_bytes / gz_bytes, 3),
        "restore_vs_psql_loop": round(shell_r / ours_r, 2),
        "worker_peak_rss_mib": round(peak_rss / 2**20)},
        goal={"worker_peak_rss_mib": ("<", 150)})


if __name__ == "__main__":
    main()
