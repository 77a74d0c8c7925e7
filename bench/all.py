#!/usr/bin/env python3
"""Run every benchmark, one after another (they share this machine's cores: never two at
once), and print one table of their figures with each goal and whether it is met.

    uv run python bench/all.py            # the standard sizes (about half an hour here)
    uv run python bench/all.py --quick    # small sizes: a smoke run of every bench
    uv run python bench/all.py --only pg_backup,submit_latency

Each bench prints a `BENCH-RESULT {json}` line (bench/common.py `report`); a bench that
fails or prints none is listed as failed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULT_MARK  # noqa: E402

# (bench, standard arguments, quick arguments)
RUNS: list[tuple[str, list[str], list[str]]] = [
    ("pg_backup", ["--size-mb", "200"], ["--size-mb", "30"]),
    ("pg_backup", ["--size-mb", "1000"], []),
    ("pg_backup", ["--size-mb", "2000"], []),
    ("mysql_backup", ["--size-mb", "300"], ["--size-mb", "30"]),
    ("redis_backup", ["--keys", "1000000"], ["--keys", "100000"]),
    ("redis_backup", ["--keys", "1000000", "--ttl-percent", "50"], []),
    ("submit_latency", ["--rate", "300", "--seconds", "10"], ["--rate", "100", "--seconds",
                                                               "3"]),
    ("sse_fanout", ["--clients", "1000", "--jobs", "20", "--procs", "2"],
     ["--clients", "100", "--jobs", "5"]),
    ("scale_out", ["--jobs", "100"], ["--jobs", "20", "--mb", "2"]),
    ("scale_out", ["--jobs", "100", "--netns"], []),  # root: workers in network namespaces
    ("metrics", ["--backups", "10000"], ["--backups", "1000"]),
]


def met(value: float, rule: list[object]) -> str:
    op, bound = str(rule[0]), float(rule[1])  # type: ignore[arg-type]
    ok = {"<": value < bound, "<=": value <= bound, ">": value > bound,
          ">=": value >= bound}[op]
    return f"{'ok  ' if ok else 'MISS'} {op} {bound:g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated bench names")
    a = ap.parse_args()
    only = {n for n in a.only.split(",") if n}
    rows: list[tuple[str, str, object, str]] = []
    failed: list[str] = []
    for name, standard, quick in RUNS:
        if only and name not in only:
            continue
        if a.quick and not quick:
            continue
        args = quick if a.quick else standard
        label = f"{name} {' '.join(args)}"
        print(f"=== {label}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args],
                              capture_output=True, text=True)
        took = time.monotonic() - t0
        sys.stdout.write(proc.stdout[-3000:])
        results = [json.loads(line[len(RESULT_MARK):]) for line in proc.stdout.splitlines()
                   if line.startswith(RESULT_MARK)]
        if proc.returncode != 0 or not results:
            failed.append(label)
            sys.stdout.write(proc.stderr[-3000:])
            continue
        for res in results:
            for key, value in res["figures"].items():
                goal = res["goal"].get(key)
                rows.append((res["bench"], key, value, met(float(value), goal) if goal else ""))
        print(f"({took:.0f} s)", flush=True)
    width = max([len(r[0]) for r in rows] + [5])
    print(f"\n{'bench':<{width}}  {'figure':<28} {'value':>12}  goal")
    for bench, key, value, goal in rows:
        print(f"{bench:<{width}}  {key:<28} {value!s:>12}  {goal}")
    for label in failed:
        print(f"FAILED: {label}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
