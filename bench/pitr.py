#!/usr/bin/env python3
"""Benchmark: PostgreSQL point-in-time recovery (issue 24) on a private cluster.

Safehold runs for real (`safehold api` and two `safehold worker` processes, a local
destination). pgbench is initialised at --scale (70 ≈ 1 GB), the first base is archived,
then:

1. **Recovery point.** A steady pgbench load (--tps commits/s) for --seconds while the
   archive's lag (now minus the last instant fully archived, from the streamer's state) is
   sampled every 0.5 s; at --kill-at seconds the streaming worker process is SIGKILLed
   (as the OOM killer would) and the other takes over. Reported: lag p50/p99/max over the
   whole run, the takeover time, WAL generated vs stored, the workers' peak RSS.
2. **WAL volume.** Unthrottled pgbench until --wal-mb MB of WAL more are written; the
   archive's catch-up time after it.
3. **Restore to T** (T: the end of the window), the same recovery three ways in the same
   run: by hand (zstd | tar the base, PostgreSQL's own recovery with
   deploy/safehold-wal-fetch as restore_command — what an operator would script), with
   `safehold pitr restore-cluster` then the same start, and Safehold's restore job
   (scratch recovery, dump, safety backup of the live database, guarded load).

Nothing here is a test; run it by hand (as root, like the tests), e.g. the issue's case:

    uv run python bench/pitr.py --scale 70 --seconds 600 --kill-at 300 --wal-mb 1000
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis import Redis  # noqa: E402

from bench.common import REPO, Safehold, free_port, report, safehold  # noqa: E402
from shared.keys import Keys  # noqa: E402
from tests.support.pgcluster import BINDIR, Cluster, private_cluster  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] \
        if len(values) > 1 else values[0]


def wal_bytes(cluster: Cluster) -> int:
    return int(cluster.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


def main(args: argparse.Namespace) -> None:
    figures: dict[str, object] = {"scale": args.scale, "tps": args.tps,
                                  "seconds": args.seconds}
    with private_cluster() as cluster:
        pgbench = [str(BINDIR / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U",
                   "postgres"]
        t0 = time.monotonic()
        subprocess.run([*pgbench, "-i", "-s", str(args.scale), "-q", "postgres"], check=True,
                       capture_output=True)
        db_mb = int(cluster.psql("SELECT pg_database_size('postgres')")) / 1e6
        print(f"pgbench -s {args.scale}: {db_mb:.0f} MB in {time.monotonic() - t0:.0f} s")
        work = Path(tempfile.mkdtemp(prefix="safehold-bench-pitr-"))
        targets = (f'[targets.main]\nengine = "postgresql"\nurl = "{cluster.url()}"\n'
                   '[targets.main.pitr]\nenabled = true\n')
        try:
            with safehold(work, targets, workers=2) as s:
                redis = Redis.from_url("redis://127.0.0.1:6379/0")
                key = Keys(s.prefix).pitr("main", "state")

                def state() -> dict[str, str]:
                    found = redis.hgetall(key)
                    assert isinstance(found, dict)
                    return {k.decode(): v.decode() for k, v in found.items()}
                t0 = time.monotonic()
                while not s.call("GET", "/api/v1/targets/main/recovery-window")["earliest"]:
                    time.sleep(0.5)
                figures["first_base_s"] = round(time.monotonic() - t0, 1)
                print(f"first base archived and the window open in {figures['first_base_s']} s")
                ended = _recovery_point(args, cluster, pgbench, s, state, figures)
                if args.wal_mb:
                    ended = _wal_volume(args, cluster, pgbench, state, figures)
                # T: a second before the load ended (PostgreSQL stops at the first commit
                # after T, so one must follow it), all of the WAL before it replayed
                at = ended - timedelta(seconds=1)
                w = s.call("GET", "/api/v1/targets/main/recovery-window")
                base = [b for b in w["bases"] if b["usable"]][-1]["filename"]
                figures["restore_by_hand_s"] = round(_by_hand(work, base, at), 1)
                figures["restore_cluster_s"] = round(_restore_cluster(s, at), 1)
                took, job = s.job("/api/v1/targets/main/restores",
                                  {"point_in_time": at.isoformat()})
                figures["restore_job_s"] = round(took, 1)
                redis.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    by_hand, cluster_s = figures["restore_by_hand_s"], figures["restore_cluster_s"]
    assert isinstance(by_hand, float) and isinstance(cluster_s, float)
    figures["restore_cluster_vs_by_hand"] = round(cluster_s / by_hand, 2)
    print(f"restore to T: by hand {by_hand} s, restore-cluster + start {cluster_s} s "
          f"({figures['restore_cluster_vs_by_hand']}x), Safehold's restore job into the live "
          f"database {figures['restore_job_s']} s")
    report("pitr", figures, goal={"lag_p99_s": ("<", 5.0)})


State = Callable[[], dict[str, str]]


def _recovery_point(args: argparse.Namespace, cluster: Cluster, pgbench: list[str],
                    s: Safehold, state: State, figures: dict[str, object]) -> datetime:
    wal_before = wal_bytes(cluster)
    load = subprocess.Popen([*pgbench, "-T", str(args.seconds), "-R", str(args.tps), "-c", "4",
                             "-n", "postgres"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    lags: list[float] = []
    t_start = time.monotonic()
    killed_at = taken_at = None
    victim = None
    while load.poll() is None:
        now = time.monotonic() - t_start
        st = state()
        if st.get("covers_until"):
            at = datetime.fromisoformat(st["covers_until"].replace("Z", "+00:00"))
            lags.append((datetime.now(UTC) - at).total_seconds())
        if args.kill_at and killed_at is None and now >= args.kill_at:
            victim = next(w for w in s.workers if f":{w.pid}:" in st.get("streamer", ""))
            victim.send_signal(signal.SIGKILL)
            killed_at = now
        if victim is not None and taken_at is None and st.get("streamer") and \
                f":{victim.pid}:" not in st["streamer"]:
            taken_at = now
        time.sleep(0.5)
    ended = datetime.now(UTC)
    generated = wal_bytes(cluster) - wal_before
    time.sleep(3)
    archive = s.config.parent / "backups" / "main.pitr"
    stored = sum(p.stat().st_size for p in archive.glob("wal*")
                 if not p.name.endswith(".json"))
    figures.update(lag_p50_s=round(pct(lags, 50), 2), lag_p99_s=round(pct(lags, 99), 2),
                   lag_max_s=round(max(lags), 2), lag_samples=len(lags),
                   wal_generated_mb=round(generated / 1e6, 1),
                   wal_stored_mb=round(stored / 1e6, 1),
                   worker_peak_rss_mib=round(s.rss.peak / 2**20))
    if killed_at is not None:
        figures["takeover_s"] = round((taken_at or float("nan")) - killed_at, 1)
    print(f"archive lag over {args.seconds} s at {args.tps} tps: p50 {figures['lag_p50_s']} s, "
          f"p99 {figures['lag_p99_s']} s, max {figures['lag_max_s']} s ({len(lags)} samples)"
          + (f"; streaming worker SIGKILLed at {killed_at:.0f} s, taken over in "
             f"{figures['takeover_s']} s" if killed_at is not None else ""))
    print(f"WAL generated {figures['wal_generated_mb']} MB, stored (zstd) "
          f"{figures['wal_stored_mb']} MB; first worker's peak RSS "
          f"{figures['worker_peak_rss_mib']} MiB")
    return ended


def _wal_volume(args: argparse.Namespace, cluster: Cluster, pgbench: list[str],
                state: State, figures: dict[str, object]) -> datetime:
    before = wal_bytes(cluster)
    t0 = time.monotonic()
    while wal_bytes(cluster) - before < args.wal_mb * 1e6:
        subprocess.run([*pgbench, "-T", "10", "-c", "4", "-n", "postgres"], check=True,
                       capture_output=True)
    written = time.monotonic() - t0
    end = datetime.now(UTC)  # (the last pgbench has ended)
    t1 = time.monotonic()
    while True:
        st = state()
        covers = st.get("covers_until")
        if covers and datetime.fromisoformat(covers.replace("Z", "+00:00")) >= end:
            break
        time.sleep(0.5)
    figures.update(wal_volume_mb=round((wal_bytes(cluster) - before) / 1e6),
                   wal_write_s=round(written, 1),
                   archive_catch_up_s=round(time.monotonic() - t1, 1))
    print(f"{figures['wal_volume_mb']} MB of WAL written unthrottled in {written:.0f} s; the "
          f"archive had all of it {figures['archive_catch_up_s']} s after")
    return end


def _start_and_wait(data: Path, sock: Path, port: int) -> float:
    t0 = time.monotonic()
    server = subprocess.Popen(["runuser", "-u", "postgres", "--", str(BINDIR / "postgres"),
                               "-D", str(data), "-c", f"port={port}", "-c",
                               "listen_addresses=", "-c", f"unix_socket_directories={sock}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while subprocess.run([str(BINDIR / "psql"), "-X", "-tA", "-h", str(sock), "-p",
                              str(port), "-U", "postgres", "-c", "SELECT pg_is_in_recovery()"],
                             capture_output=True, text=True).stdout.strip() != "f":
            if server.poll() is not None:
                assert server.stderr is not None
                raise SystemExit("the recovery stopped: "
                                 + server.stderr.read().decode()[-2000:])
            time.sleep(0.2)
        return time.monotonic() - t0
    finally:
        server.terminate()
        server.wait(60)


def _by_hand(work: Path, base: str, at: datetime) -> float:
    """What an operator would script: unpack the base, PostgreSQL's own recovery."""
    root = Path(tempfile.mkdtemp(prefix="safehold-bench-byhand-"))
    archive, data = work / "backups" / "main.pitr", root / "data"
    data.mkdir(mode=0o700)
    try:
        t0 = time.monotonic()
        script = (f'zstd -dc "{archive / base}" | tar -x -C "{data}"\n'
                  f'rm -f "{data}/postgresql.auto.conf" "{data}/postmaster.pid"\n'
                  f'touch "{data}/recovery.signal"\n'
                  f"cat >> \"{data}/postgresql.conf\" <<CONF\n"
                  f"restore_command = '{REPO / 'deploy' / 'safehold-wal-fetch'} {archive} "
                  f"%f %p'\nrecovery_target_time = '{at.isoformat()}'\n"
                  "recovery_target_action = 'promote'\nCONF\n"
                  f'chmod -R a+rX "{work}" && chown -R postgres "{root}"\n')
        subprocess.run(["sh", "-ec", script], check=True)
        unpacked = time.monotonic() - t0
        return unpacked + _start_and_wait(data, root, free_port())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _restore_cluster(s: Safehold, at: datetime) -> float:
    root = Path(tempfile.mkdtemp(prefix="safehold-bench-cluster-"))
    root.chmod(0o755)
    try:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "api.cli", "--config", str(s.config), "pitr",
                        "restore-cluster", "main", "--to", at.isoformat(), "--data-dir",
                        str(root / "data")], cwd=REPO, check=True, capture_output=True)
        written = time.monotonic() - t0
        shutil.chown(root, "postgres")
        return written + _start_and_wait(root / "data", root, free_port())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale (70 ≈ 1 GB)")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--tps", type=int, default=50)
    parser.add_argument("--kill-at", type=int, default=0,
                        help="SIGKILL the streaming worker this many seconds into the load")
    parser.add_argument("--wal-mb", type=int, default=0,
                        help="then write this much WAL unthrottled before the restores")
    main(parser.parse_args())
