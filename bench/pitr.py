#!/usr/bin/env python3
"""Benchmark: the PostgreSQL WAL archive (issue 24) on a private cluster.

Starts a private cluster (tests/support/pgcluster.py), a PITR streamer (worker.pitr) into a
local destination, and a steady pgbench load (--tps commits/s) for --seconds; meanwhile
samples the archive's lag every 0.5 s (now minus the last instant fully archived) and
reports p50/p99/max, WAL generated vs stored, and the process's peak RSS. Then times a
recovery to an instant near the end by hand from the archive: the base unpacked with
zstd | tar, PostgreSQL's own recovery with deploy/safehold-wal-fetch as restore_command
(what an operator would script). Safehold's own restore to T (the same recovery, then a
dump and the guarded load) is not timed here yet. Nothing here is a test; run it by hand
(as root, like the tests):

    uv run python bench/pitr.py --seconds 120 --tps 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from shared.config import parse_settings  # noqa: E402
from shared.keys import Keys  # noqa: E402
from shared.notify import Notifier  # noqa: E402
from shared.pitr_window import window  # noqa: E402
from shared.storage.catalog import Catalog  # noqa: E402
from tests.support.pgcluster import BINDIR, free_port, private_cluster  # noqa: E402
from worker.pitr import PitrService  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main(args: argparse.Namespace) -> None:
    with private_cluster() as cluster:
        subprocess.run([str(BINDIR / "pgbench"), "-i", "-s", "5", "-q", "-h", "127.0.0.1",
                        "-p", str(cluster.port), "-U", "postgres", "postgres"], check=True,
                       capture_output=True)
        work = Path(tempfile.mkdtemp(prefix="safehold-bench-pitr-"))
        prefix = f"bench-pitr-{os.getpid()}"
        settings = parse_settings({
            "redis": {"url": "redis://127.0.0.1:6379/0", "prefix": prefix},
            "storage": {"path": str(work / "backups")},
            "worker": {"daily_prune": "off"},
            "targets": {"main": {"engine": "postgresql", "url": cluster.url(),
                                 "pitr": {"enabled": True}}}}, {}, base=work, source="<bench>")
        redis = Redis.from_url("redis://127.0.0.1:6379/0")
        catalog = Catalog(settings)
        service = PitrService(settings, redis, catalog, Notifier(settings), "bench")
        task = asyncio.create_task(service.run())
        key = Keys(prefix).pitr("main", "state")
        try:
            while True:  # the first base, then the load
                w = window(await catalog.list_backups("main.pitr"), datetime.now(UTC))
                if w["earliest"]:
                    break
                await asyncio.sleep(0.5)
            wal_before = int(cluster.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
            load = subprocess.Popen(
                [str(BINDIR / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U",
                 "postgres", "-T", str(args.seconds), "-R", str(args.tps), "-c", "4", "-n",
                 "postgres"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lags: list[float] = []
            t_end = time.monotonic() + args.seconds
            target_time = None  # an instant in the middle of the load (commits after it)
            while time.monotonic() < t_end:
                if target_time is None and time.monotonic() > t_end - args.seconds / 2:
                    target_time = datetime.now(UTC)
                state = {k.decode(): v.decode() for k, v in
                         (await redis.hgetall(key)).items()}  # type: ignore[misc]
                if state.get("covers_until"):
                    at = datetime.fromisoformat(state["covers_until"].replace("Z", "+00:00"))
                    lags.append((datetime.now(UTC) - at).total_seconds())
                await asyncio.sleep(0.5)
            load.wait()
            assert target_time is not None
            wal_generated = int(cluster.psql(
                "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")) - wal_before
            await asyncio.sleep(3)  # the last shipment
            stored = sum(p.stat().st_size for p in (work / "backups" / "main.pitr").glob("wal*")
                         if not p.name.endswith(".json"))
            print(f"archive lag over {args.seconds} s at {args.tps} tps: p50 "
                  f"{pct(lags, 50):.2f} s, p99 {pct(lags, 99):.2f} s, max {max(lags):.2f} s "
                  f"({len(lags)} samples)")
            print(f"WAL generated {wal_generated / 1e6:.1f} MB, stored (zstd) "
                  f"{stored / 1e6:.1f} MB")
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"bench process (streamer included) peak RSS {rss:.0f} MiB")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        listing = await catalog.list_backups("main.pitr")
        w = window(listing, datetime.now(UTC))
        by_hand = by_hand_recovery(work, w["bases"][-1]["filename"], target_time)
        print(f"restore to T by hand (zstd | tar, restore_command): {by_hand:.1f} s")
        await catalog.close()
        await redis.aclose()
        shutil.rmtree(work, ignore_errors=True)


def by_hand_recovery(work: Path, base: str, at: datetime) -> float:
    """What an operator would script: unpack the base, PostgreSQL's own recovery."""
    root = Path(tempfile.mkdtemp(prefix="safehold-bench-byhand-"))
    archive, data, port = work / "backups" / "main.pitr", root / "data", free_port()
    data.mkdir(mode=0o700)
    t0 = time.monotonic()
    script = (f'zstd -dc "{archive / base}" | tar -x -C "{data}"\n'
              f'rm -f "{data}/postgresql.auto.conf" "{data}/postmaster.pid"\n'
              f'touch "{data}/recovery.signal"\n'
              f"cat >> \"{data}/postgresql.conf\" <<CONF\nport = {port}\n"
              f"listen_addresses = ''\nunix_socket_directories = '{root}'\n"
              f"restore_command = '{ROOT / 'deploy' / 'safehold-wal-fetch'} {archive} %f %p'\n"
              f"recovery_target_time = '{at.isoformat()}'\n"
              "recovery_target_action = 'promote'\nCONF\n"
              f'chmod -R a+rX "{work}" && chown -R postgres "{root}"\n')
    subprocess.run(["sh", "-ec", script], check=True)
    server = subprocess.Popen(["runuser", "-u", "postgres", "--", str(BINDIR / "postgres"),
                               "-D", str(data)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        while subprocess.run([str(BINDIR / "psql"), "-X", "-tA", "-h", str(root), "-p",
                              str(port), "-U", "postgres", "-c", "SELECT pg_is_in_recovery()"],
                             capture_output=True, text=True).stdout.strip() != "f":
            if server.poll() is not None:
                raise SystemExit("the by-hand recovery stopped (see PostgreSQL's log)")
            time.sleep(0.2)
        return time.monotonic() - t0
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--tps", type=int, default=50)
    asyncio.run(main(parser.parse_args()))
