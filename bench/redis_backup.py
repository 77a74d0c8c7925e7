#!/usr/bin/env python3
"""Benchmark: Safehold's Redis backup (SCAN + DUMP → RESP) in keys/s, on 1M small keys.

Starts a private redis-server, fills it with `DEBUG POPULATE` (--keys, 1M by default;
--ttl-percent gives that share an expiry),
then times: `redis-cli --rdb - | gzip -6` (the server's own snapshot, the shell baseline),
a Safehold RESP backup through the API, `gunzip -c | redis-cli --pipe` into an empty
server, and a Safehold restore into an empty server. Prints keys/s and ratios.

    uv run python bench/redis_backup.py [--keys 1000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_backup, free_port, report, safehold, sh  # noqa: E402


def start(work: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    (work / name).mkdir()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(work / name),
                             "--repl-diskless-sync-delay", "0", "--enable-debug-command", "local"],
                            stdout=subprocess.DEVNULL)
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True
                          ).stdout.strip() == b"PONG":
            break
        time.sleep(0.05)
    return proc, port


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], check=True,
                          capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--big-mb", type=int, default=0,
                    help="add one string key of this many MB (worker RSS with a big key)")
    ap.add_argument("--ttl-percent", type=int, default=0,
                    help="give this share of the keys an expiry (1 h): the scan then asks "
                         "each key's PTTL, which a database without expiries skips")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safehold-bench-redis-"))
    src, port = start(work, "src")
    dst, port2 = start(work, "dst")
    results: dict[str, float] = {}
    try:
        cli(port, "DEBUG", "POPULATE", str(args.keys), "key", "20")
        if args.ttl_percent:
            cli(port, "EVAL", "for i = 0, tonumber(ARGV[1]) - 1 do "
                "if i % 100 < tonumber(ARGV[2]) then redis.call('PEXPIRE', 'key:' .. i, "
                "3600000) end end", "0", str(args.keys), str(args.ttl_percent))
        if args.big_mb:  # random bytes: neither DUMP's LZF nor gzip can shrink them
            blob = work / "big.bin"
            blob.write_bytes(os.urandom(args.big_mb * 2**20))
            sh(f"redis-cli -p {port} -x SET big < {blob} > /dev/null")
        n = int(cli(port, "DBSIZE"))
        gz = work / "shell.rdb.gz"
        results["redis-cli --rdb - | gzip -6"] = sh(
            f"redis-cli -p {port} --rdb - 2>/dev/null | gzip -6 > {gz}")
        targets = f"""
[targets.bench]
engine = "redis"
url = "redis://127.0.0.1:{port}"
[targets.restore]
engine = "redis"
url = "redis://127.0.0.1:{port2}"
"""
        with safehold(work, targets) as app:
            results["safehold backup (RESP)"], job = app.job("/api/v1/targets/bench/backups",
                                                              {})
            backup_peak = app.rss.peak
            name = job["result"]["filename"]
            path = work / "backups" / "bench" / name
            results["gunzip -c | redis-cli --pipe"] = sh(
                f"gunzip -c {path} | redis-cli -p {port2} --pipe > /dev/null")
            assert int(cli(port2, "DBSIZE")) == n
            cli(port2, "FLUSHALL")
            copy_backup(work, name, "bench", "restore")
            results["safehold restore"], _ = app.job(
                "/api/v1/targets/restore/restores",
                {"backup": name, "create_safety_backup": False})
            assert int(cli(port2, "DBSIZE")) == n
            peak = app.rss.peak
    finally:
        src.terminate()
        dst.terminate()
        src.wait()
        dst.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{n} keys")
    for k, v in results.items():
        print(f"  {k:<30} {v:7.2f} s  ({n / v:,.0f} keys/s)")
    print(f"worker peak RSS: backup {backup_peak / 2**20:.0f} MB, "
          f"backup + restore {peak / 2**20:.0f} MB")
    label = f"redis_backup {n} keys" + (f", {args.ttl_percent}% expiring" if args.ttl_percent
                                        else "")
    report(label + (f" + {args.big_mb} MB key" if args.big_mb else ""), {
        "backup_keys_per_s": round(n / results["safehold backup (RESP)"]),
        "restore_vs_redis_cli_pipe": round(results["gunzip -c | redis-cli --pipe"]
                                           / results["safehold restore"], 2),
        "worker_peak_rss_mib": round(peak / 2**20),
        "backup_peak_rss_mib": round(backup_peak / 2**20)},
        goal={"backup_keys_per_s": (">=", 300_000), "worker_peak_rss_mib": ("<", 150)})


if __name__ == "__main__":
    main()
