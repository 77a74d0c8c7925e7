#!/usr/bin/env python3
"""Benchmark: restoring one table out of a big PostgreSQL backup (issue 25 `tables`).

Generates a database of about --size-mb (bench/pg_backup.py's generator) plus a table
`orders` of about --table-mb, takes one Safehold backup, zeroes every order (the too-wide
UPDATE), then in the same run times:
  1. Safehold's restore of `public.orders` alone, with its safety backup (of that table)
  2. the same without a safety backup (the load path alone)
  3. Safehold's restore of the whole backup (no safety backup)
  4. what an operator does by hand without it: `gunzip -c dump | psql` into a scratch
     database, then `pg_dump --data-only -t public.orders scratch | psql` into the live
     one after a TRUNCATE
and reports the WAL each one wrote (what reached the database), the worker's peak RSS, and
the latency of the contents listing (`GET …/contents`, read from the manifest). Run by hand:

    uv run python bench/table_restore.py --size-mb 2000 --table-mb 20 --keep
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, safehold, sh  # noqa: E402
from pg_backup import PG, db_size, generate, psql  # noqa: E402


def wal_lsn() -> int:
    return int(psql("postgres", "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


def orders(db: str, table_mb: int) -> None:
    rows = int(table_mb * 2**20 / 90)
    psql(db, f"""DROP TABLE IF EXISTS orders CASCADE;
        CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL,
            total numeric NOT NULL, note text);
        INSERT INTO orders (customer, total, note) SELECT g % 5000, g * 1.5,
            'order ' || md5(g::text) FROM generate_series(1, {rows}) g;
        CREATE INDEX orders_customer ON orders (customer)""")
    psql(db, "VACUUM ANALYZE orders")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=2000)
    ap.add_argument("--table-mb", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the generated database")
    args = ap.parse_args()
    db = f"safehold_bench_{args.size_mb}"
    generate(db, args.size_mb)
    orders(db, args.table_mb)
    size = db_size(db)
    table_bytes = int(psql(db, "SELECT pg_total_relation_size('orders')"))
    fingerprint = "SELECT md5(string_agg(o::text, '|' ORDER BY id)) FROM orders o"
    work = Path(tempfile.mkdtemp(prefix="safehold-bench-"))
    scratch = f"{db}_scratch"
    took: dict[str, float] = {}
    wal: dict[str, int] = {}
    try:
        with safehold(work, f"""
[targets.bench]
engine = "postgresql"
url = "postgresql://postgres@127.0.0.1:5432/{db}"
""") as app:
            _, job = app.job("/api/v1/targets/bench/backups", {})
            name, stored = job["result"]["filename"], job["result"]["size_bytes"]
            good = psql(db, fingerprint)
            latencies = []
            for _ in range(20):
                t0 = time.monotonic()
                app.call("GET", f"/api/v1/targets/bench/backups/{name}/contents")
                latencies.append(time.monotonic() - t0)

            # the row preview: one order looked up in the backup stream itself
            previews = []
            middle = int(psql(db, "SELECT max(id) / 2 FROM orders"))
            for _ in range(3):
                t0 = time.monotonic()
                found = app.call("GET", f"/api/v1/targets/bench/backups/{name}/contents/"
                                        f"public.orders?where=id={middle}&limit=1")
                previews.append(time.monotonic() - t0)
                assert found["rows"] and found["rows"][0][0] == str(middle), found

            def timed(label: str, body: dict[str, object]) -> None:
                psql(db, "UPDATE orders SET total = 0")
                w0 = wal_lsn()
                took[label], _ = app.job("/api/v1/targets/bench/restores",
                                         {"backup": name, **body})
                wal[label] = wal_lsn() - w0
                assert psql(db, fingerprint) == good, label

            timed("safehold, one table", {"tables": ["public.orders"]})
            timed("safehold, one table, no safety", {"tables": ["public.orders"],
                                                     "create_safety_backup": False})
            timed("safehold, whole backup", {"create_safety_backup": False})
            app.rss.stop.set()
            peak = app.rss.peak
            # by hand: the whole dump into a scratch database, then the table copied back
            psql(db, "UPDATE orders SET total = 0")
            dump = next((work / "backups" / "bench").glob(name))
            unpack = "zstd -dc" if name.endswith(".zst") else "gunzip -c"
            w0 = wal_lsn()
            t0 = time.monotonic()
            subprocess.run(["dropdb", *PG, "--if-exists", scratch], check=True)
            subprocess.run(["createdb", *PG, scratch], check=True)
            sh(f"{unpack} {dump} | psql {' '.join(PG)} -X -q -v ON_ERROR_STOP=1 "
               f"--single-transaction -d {scratch} > /dev/null")
            sh(f"(echo 'BEGIN; TRUNCATE orders;'; pg_dump {' '.join(PG)} --data-only "
               f"-t public.orders {scratch}; echo 'COMMIT;') | psql {' '.join(PG)} -X -q "
               f"-v ON_ERROR_STOP=1 -d {db} > /dev/null")
            took["by hand: whole dump to scratch, copy table"] = time.monotonic() - t0
            wal["by hand: whole dump to scratch, copy table"] = wal_lsn() - w0
            assert psql(db, fingerprint) == good
    finally:
        subprocess.run(["dropdb", *PG, "--if-exists", scratch], check=True)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            subprocess.run(["dropdb", *PG, "--if-exists", db], check=True)

    print(f"\ndatabase {size / 2**20:.0f} MB, backup {stored / 2**20:.0f} MB stored, "
          f"orders {table_bytes / 2**20:.1f} MB with its index")
    for k, v in took.items():
        print(f"  {k:<46} {v:8.2f} s   WAL {wal[k] / 2**20:9.1f} MB")
    one, whole = took["safehold, one table"], took["safehold, whole backup"]
    hand = took["by hand: whole dump to scratch, copy table"]
    p50 = statistics.median(latencies) * 1000
    print(f"one table vs whole restore : {whole / one:.1f}x faster")
    print(f"one table vs by hand       : {hand / one:.1f}x faster")
    print(f"contents listing p50       : {p50:.1f} ms")
    print(f"row preview (one order) p50: {statistics.median(previews):.2f} s")
    print(f"worker peak RSS            : {peak / 2**20:.0f} MB")
    report(f"table_restore {args.size_mb} MB / {args.table_mb} MB", {
        "one_table_s": round(one, 2), "whole_s": round(whole, 2), "by_hand_s": round(hand, 2),
        "speedup_vs_whole": round(whole / one, 1), "speedup_vs_by_hand": round(hand / one, 1),
        "wal_one_table_mib": round(wal["safehold, one table"] / 2**20, 1),
        "wal_whole_mib": round(wal["safehold, whole backup"] / 2**20, 1),
        "contents_p50_ms": round(p50, 1), "preview_p50_s": round(statistics.median(previews), 2),
        "worker_peak_rss_mib": round(peak / 2**20)},
        goal={"worker_peak_rss_mib": ("<", 150)})


if __name__ == "__main__":
    main()
