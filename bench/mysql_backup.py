#!/usr/bin/env python3
"""Benchmark: Safehold vs `mariadb-dump | gzip` (MariaDB/MySQL), in one run.

Generates an InnoDB database of about --size-mb (a wide text table and a narrow numeric
one), then times bare `mariadb-dump --single-transaction --hex-blob > /dev/null`, the same
`| gzip -6` and `| igzip -1` (ISA-L, the fastest gzip there is), a Safehold backup
through the API, `gunzip -c | mariadb` into an empty database, and a Safehold restore of
its backup into an empty database (no safety backup). Prints ratios and the worker's
peak RSS. Run by hand:

    uv run python bench/mysql_backup.py --size-mb 300 [--keep]
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

SOCKET = "/run/mysqld/mysqld.sock"


def sql(statement: str, db: str = "") -> str:
    return subprocess.run(["mariadb", "-N", "-B", *([db] if db else []), "-e", statement],
                          check=True, capture_output=True, text=True).stdout.strip()


def size_of(db: str) -> int:
    return int(sql("SELECT COALESCE(SUM(data_length + index_length), 0) FROM "
                   f"information_schema.tables WHERE table_schema = '{db}'") or 0)


def generate(db: str, size_mb: int) -> None:
    if sql(f"SHOW DATABASES LIKE '{db}'") and size_of(db) > size_mb * 0.8 * 2**20:
        print(f"reusing {db} ({size_of(db) / 2**20:.0f} MB)")
        return
    sql(f"DROP DATABASE IF EXISTS `{db}`")
    sql(f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4")
    rows = int(size_mb * 2**20 * 0.7 / 600)
    print(f"generating {db}: {rows} text rows + {rows * 4} numeric rows …", flush=True)
    sql("""CREATE TABLE docs (id INT PRIMARY KEY, at DATETIME(6), body TEXT, tag VARCHAR(20))
           ENGINE=InnoDB""", db)
    sql("CREATE TABLE nums (id INT PRIMARY KEY, a BIGINT, b DOUBLE, c DECIMAL(12,4)) "
        "ENGINE=InnoDB", db)
    step = 200_000
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        sql(f"""INSERT INTO docs SELECT seq, NOW(6) - INTERVAL seq SECOND,
                CONCAT_WS(' ', MD5(RAND()), MD5(RAND()), MD5(RAND()), MD5(RAND()), MD5(RAND()),
                          MD5(RAND()), MD5(RAND()), MD5(RAND()), 'lorem ipsum dolor sit amet',
                          MD5(RAND()), MD5(RAND()), MD5(RAND()), seq),
                CONCAT('tag', seq % 100) FROM seq_{lo + 1}_to_{hi}""", db)
        sql(f"""INSERT INTO nums SELECT seq, seq * 7919, RAND() * 1e6, seq / 7
                FROM seq_{4 * lo + 1}_to_{4 * hi}""", db)
    sql("ANALYZE TABLE docs, nums", db)
    print(f"generated {size_of(db) / 2**20:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    db = f"safehold_bench_{args.size_mb}"
    generate(db, args.size_mb)
    work = Path(tempfile.mkdtemp(prefix="safehold-bench-my-"))
    results: dict[str, float] = {}
    dump = f"mariadb-dump --single-transaction --hex-blob --routines --triggers --events {db}"
    try:
        sh(f"{dump} > /dev/null")
        results["mariadb-dump > /dev/null"] = sh(f"{dump} > /dev/null")
        gz = work / "shell.sql.gz"
        results["mariadb-dump | gzip -6"] = sh(f"{dump} | gzip -6 > {gz}")
        # the fastest gzip an operator could pipe to (ISA-L, level 1: Safehold's own codec)
        results["mariadb-dump | igzip -1"] = sh(
            f"{dump} | {sys.executable} -m isal.igzip -1 -c > {work / 'shell.igz'}")
        url = f"mysql://root@localhost:3306/{{}}?unix_socket={SOCKET}"
        targets = f"""
[targets.bench]
engine = "mysql"
url = "{url.format(db)}"
[targets.restore]
engine = "mysql"
url = "{url.format(db + '_restore')}"
"""
        for extra in ("_restore", "_shell"):
            sql(f"DROP DATABASE IF EXISTS `{db}{extra}`")
            sql(f"CREATE DATABASE `{db}{extra}` CHARACTER SET utf8mb4")
        with safehold(work, targets) as app:
            time.sleep(0.5)
            idle = app.rss.peak
            results["safehold backup"], job = app.job("/api/v1/targets/bench/backups", {})
            name, ours = job["result"]["filename"], job["result"]["size_bytes"]
            results["gunzip -c | mariadb"] = sh(f"gunzip -c {gz} | mariadb {db}_shell")
            copy_backup(work, name, "bench", "restore")
            results["safehold restore"], _ = app.job(
                "/api/v1/targets/restore/restores",
                {"backup": name, "create_safety_backup": False})
            peak = app.rss.peak
        gz_bytes = gz.stat().st_size
    finally:
        for extra in ("_restore", "_shell"):
            sql(f"DROP DATABASE IF EXISTS `{db}{extra}`")
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            sql(f"DROP DATABASE IF EXISTS `{db}`")
    print(f"\ndatabase {args.size_mb} MB (InnoDB data+index)")
    for k, v in results.items():
        print(f"  {k:<26} {v:7.2f} s")
    r = results
    print(f"backup vs bare mariadb-dump : "
          f"{r['mariadb-dump > /dev/null'] / r['safehold backup']:.2f}x")
    print(f"backup vs mariadb-dump|gzip : "
          f"{r['mariadb-dump | gzip -6'] / r['safehold backup']:.2f}x")
    print(f"backup vs mariadb-dump|igzip: "
          f"{r['mariadb-dump | igzip -1'] / r['safehold backup']:.2f}x")
    print(f"output size vs gzip -6      : {ours / gz_bytes:.3f}")
    print(f"restore vs gunzip|mariadb   : "
          f"{r['gunzip -c | mariadb'] / r['safehold restore']:.2f}x")
    print(f"worker RSS idle / peak      : {idle / 2**20:.0f} / {peak / 2**20:.0f} MB")
    report(f"mysql_backup {args.size_mb} MB", {
        "backup_vs_mariadb_dump": round(r["mariadb-dump > /dev/null"] / r["safehold backup"], 2),
        "backup_vs_dump_gzip": round(r["mariadb-dump | gzip -6"] / r["safehold backup"], 2),
        "backup_vs_dump_igzip1": round(r["mariadb-dump | igzip -1"] / r["safehold backup"],
                                       2),
        "size_vs_gzip6": round(ours / gz_bytes, 3),
        "restore_vs_mariadb": round(r["gunzip -c | mariadb"] / r["safehold restore"], 2),
        "worker_peak_rss_mib": round(peak / 2**20)},
        goal={"backup_vs_mariadb_dump": (">=", 0.9), "worker_peak_rss_mib": ("<", 150)})


if __name__ == "__main__":
    main()
