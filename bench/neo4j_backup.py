#!/usr/bin/env python3
"""Benchmark: Neo4j export/import throughput (nodes/s) through Safehold's API.

Measured against ArcadeDB's Bolt endpoint (the Neo4j stand-in on these machines, see
../shared/SERVICES.md) — real Neo4j will differ. Starts ArcadeDB from .standins/ (run
./scripts/standins.sh first), loads --nodes Person nodes with one relationship each,
then times a Safehold backup and a restore (clean: delete all, then replay the script).

    uv run python bench/neo4j_backup.py [--nodes 50000]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neo4j import GraphDatabase

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import free_port, safehold  # noqa: E402

from tests.standins.arcadedb import arcadedb_command, arcadedb_home  # noqa: E402

PASSWORD = "BenchPw-123456"


def start_arcadedb(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    home = arcadedb_home()
    if home is None:
        sys.exit("ArcadeDB stand-in missing: run ./scripts/standins.sh")
    http_port, bolt = free_port(), free_port()
    proc = subprocess.Popen(arcadedb_command(home, work, http_port, bolt, PASSWORD, heap="1g"),
                            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", bolt)) == 0:
                break
        time.sleep(0.2)
    driver = GraphDatabase.driver(f"bolt://127.0.0.1:{bolt}", auth=("root", PASSWORD))
    for _ in range(100):
        try:
            with driver.session(database="neo4j") as s:
                s.run("RETURN 1").consume()
            break
        except Exception:
            time.sleep(0.3)
    driver.close()
    return proc, bolt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=50_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safehold-bench-neo4j-"))
    proc, bolt = start_arcadedb(work)
    try:
        driver = GraphDatabase.driver(f"bolt://127.0.0.1:{bolt}", auth=("root", PASSWORD))
        with driver.session(database="neo4j") as s:
            s.run("CREATE CONSTRAINT p_uid IF NOT EXISTS FOR (p:Person) REQUIRE p.uid IS UNIQUE"
                  ).consume()
            for lo in range(0, args.nodes, 5000):
                s.run("UNWIND range($lo, $hi) AS i CREATE (:Person {uid: i, name: 'person ' + "
                      "toString(i), score: i / 7.0, tags: ['a', 'b']})",
                      lo=lo, hi=min(args.nodes, lo + 5000) - 1).consume()
            s.run("MATCH (a:Person) WITH a MATCH (b:Person {uid: (a.uid + 1) % $n}) "
                  "CREATE (a)-[:NEXT {w: a.uid}]->(b)", n=args.nodes).consume()
        driver.close()
        targets = f"""
[targets.graph]
engine = "neo4j"
url = "bolt://root@127.0.0.1:{bolt}/neo4j"
password_env = "BENCH_NEO4J_PW"
"""
        with safehold(work / "app", targets, env={"BENCH_NEO4J_PW": PASSWORD}) as app:
            backup_s, job = app.job("/api/v1/targets/graph/backups", {})
            restore_s, _ = app.job("/api/v1/targets/graph/restores",
                                   {"backup": job["result"]["filename"],
                                    "create_safety_backup": False})
            peak = app.rss.peak
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    n = args.nodes
    print(f"\n{n} nodes + {n} relationships on ArcadeDB's Bolt endpoint (a stand-in)")
    print(f"  export (backup)  {backup_s:7.2f} s  {n / backup_s:,.0f} nodes/s "
          f"({2 * n / backup_s:,.0f} entities/s)")
    print(f"  import (restore) {restore_s:7.2f} s  {n / restore_s:,.0f} nodes/s "
          f"({2 * n / restore_s:,.0f} entities/s)")
    print(f"  worker peak RSS  {peak / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
