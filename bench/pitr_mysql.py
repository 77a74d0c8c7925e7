#!/usr/bin/env python3
"""Benchmark: MySQL/MariaDB point-in-time recovery (issue 26) on a private mariadbd.

Safehold runs for real (`safehold api` and two `safehold worker` processes, a local
destination). A table of --rows rows (~250 bytes each) is loaded, a base backup taken, then:

1. **Recovery point.** A steady write load (--tps single-row commits/s: inserts and
   updates) for --seconds while the archive's lag (now minus the last instant fully
   archived, from the streamer's state) is sampled every 0.5 s; at --kill-at seconds the
   streaming worker process is SIGKILLed and the other takes over. Reported: lag p50/p99/
   max, the takeover time, binlog written vs stored.
2. **Restore to T** (T: a second before the load ended), the same recovery two ways in the
   same run, on the same server: by hand — what an operator would script: the base's dump
   into a new database, then `mariadb-binlog --start-position --stop-datetime
   --rewrite-db | mariadb` over the server's own binlog files — and Safehold's restore job
   (the base and the archived binlog in a scratch server, checked, dumped, a safety backup
   of the live database, the guarded load). Both results are compared (CHECKSUM TABLE).

Nothing here is a test; run it by hand (as root, like the tests), e.g.:

    uv run python bench/pitr_mysql.py --rows 2000000 --seconds 300 --tps 100 --kill-at 150
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pymysql  # noqa: E402
from redis import Redis  # noqa: E402

from bench.common import Safehold, report, safehold  # noqa: E402
from shared.keys import Keys  # noqa: E402
from tests.support.mariadb import REP_PW, Server, private_mariadb  # noqa: E402

PW_ENV = "SAFEHOLD_BENCH_REP_PASSWORD"


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] \
        if len(values) > 1 else values[0]


def load_rows(server: Server, rows: int) -> None:
    server.sql("CREATE TABLE t (id int PRIMARY KEY AUTO_INCREMENT, k int, "
               "pad varchar(240), at datetime(6) DEFAULT NOW(6), KEY (k))", "app")
    for start in range(0, rows, 200_000):
        n = min(200_000, rows - start)
        server.sql(f"INSERT INTO t (k, pad) SELECT seq % 1000, REPEAT(SHA2(seq, 256), 3) "
                   f"FROM seq_1_to_{n}", "app")


def writes(server: Server, tps: int, seconds: int, stop: threading.Event) -> None:
    conn = pymysql.connect(host="127.0.0.1", port=server.port, user="rep", password=REP_PW,
                           database="app", autocommit=True)
    t0, i = time.monotonic(), 0
    with conn.cursor() as cur:
        while not stop.is_set() and time.monotonic() - t0 < seconds:
            if i % 2:
                cur.execute("UPDATE t SET k = k + 1 WHERE id = %s", (i * 7919 % 1000 + 1,))
            else:
                cur.execute("INSERT INTO t (k, pad) VALUES (%s, REPEAT('w', 200))", (i,))
            i += 1
            time.sleep(max(0.0, t0 + i / tps - time.monotonic()))
    conn.close()


def main(args: argparse.Namespace) -> None:
    figures: dict[str, object] = {"rows": args.rows, "tps": args.tps, "seconds": args.seconds}
    with private_mariadb() as server:
        t0 = time.monotonic()
        load_rows(server, args.rows)
        server.sql("ANALYZE TABLE t", "app")
        size = int(server.sql("SELECT SUM(data_length + index_length) FROM "
                              "information_schema.TABLES WHERE table_schema = 'app'"))
        figures["db_mb"] = round(size / 1e6)
        print(f"{args.rows} rows, {figures['db_mb']} MB in {time.monotonic() - t0:.0f} s")
        work = Path(tempfile.mkdtemp(prefix="safehold-bench-pitr-mysql-"))
        targets = (f'[targets.main]\nengine = "mysql"\nurl = "{server.url()}"\n'
                   f'password_env = "{PW_ENV}"\n[targets.main.pitr]\nenabled = true\n')
        try:
            with safehold(work, targets, env={PW_ENV: REP_PW}, workers=2) as s:
                _run(args, server, s, work, figures)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ratio = figures["restore_job_s"] / figures["restore_by_hand_s"]  # type: ignore[operator]
    figures["restore_job_vs_by_hand"] = round(ratio, 2)
    print(f"restore to T: by hand {figures['restore_by_hand_s']} s, Safehold's restore job "
          f"{figures['restore_job_s']} s ({figures['restore_job_vs_by_hand']}x)")
    report("pitr_mysql", figures, goal={"lag_p99_s": ("<", 5.0)})


def _run(args: argparse.Namespace, server: Server, s: Safehold, work: Path,
         figures: dict[str, object]) -> None:
    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    key = Keys(s.prefix).pitr("main", "state")

    def state() -> dict[str, str]:
        found = redis.hgetall(key)
        assert isinstance(found, dict)
        return {k.decode(): v.decode() for k, v in found.items()}
    took, base_job = s.job("/api/v1/targets/main/backups", {})
    figures["base_backup_s"] = round(took, 1)
    base = base_job["result"]["filename"]
    while not s.call("GET", "/api/v1/targets/main/recovery-window")["earliest"]:
        time.sleep(0.5)
    binlog_before = _binlog_bytes(server)
    stop = threading.Event()
    load = threading.Thread(target=writes, args=(server, args.tps, args.seconds, stop))
    load.start()
    lags: list[float] = []
    t_start = time.monotonic()
    killed_at = taken_at = None
    victim = None
    while load.is_alive():
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
    while True:  # the archive holds everything written
        st = state()
        if st.get("covers_until", "") >= ended.isoformat()[:23]:
            break
        time.sleep(0.5)
    archive = work / "backups" / "main.pitr"
    docs = [json.loads(p.read_text()) for p in archive.glob("binlog*.json")]
    plain, stored = sum(d["raw_bytes"] for d in docs), sum(d["size_bytes"] for d in docs)
    figures.update(lag_p50_s=round(pct(lags, 50), 2), lag_p99_s=round(pct(lags, 99), 2),
                   lag_max_s=round(max(lags), 2), lag_samples=len(lags),
                   binlog_written_mb=round((_binlog_bytes(server) - binlog_before) / 1e6, 1),
                   binlog_archived_mb=round(plain / 1e6, 1),
                   binlog_stored_mb=round(stored / 1e6, 1), archive_objects=len(docs),
                   worker_peak_rss_mib=round(s.rss.peak / 2**20))
    if killed_at is not None:
        figures["takeover_s"] = round((taken_at or float("nan")) - killed_at, 1)
    print(f"archive lag over {args.seconds} s at {args.tps} commits/s: p50 "
          f"{figures['lag_p50_s']} s, p99 {figures['lag_p99_s']} s, max {figures['lag_max_s']}"
          f" s ({len(lags)} samples)" + (f"; streaming worker SIGKILLed at {killed_at:.0f} s,"
                                          f" taken over in {figures['takeover_s']} s"
                                          if killed_at is not None else ""))
    at = (ended - timedelta(seconds=1)).replace(microsecond=0)
    figures["restore_by_hand_s"] = round(_by_hand(server, work, base, at), 1)
    by_hand = server.sql("CHECKSUM TABLE byhand.t").split()[-1]
    took, job = s.job("/api/v1/targets/main/restores", {"point_in_time": at.isoformat()})
    figures["restore_job_s"] = round(took, 1)
    figures["same_result"] = server.sql("CHECKSUM TABLE app.t").split()[-1] == by_hand
    print(f"Safehold and by hand give the same table: {figures['same_result']}")
    redis.close()


def _binlog_bytes(server: Server) -> int:
    return sum(int(line.split()[1]) for line in server.sql("SHOW BINARY LOGS").splitlines())


def _by_hand(server: Server, work: Path, base: str, at: datetime) -> float:
    """What an operator would script on the server: the base's dump into a new database,
    then the binlog after its position, to T, rewritten to that database."""
    manifest = json.loads((work / "backups" / "main" / f"{base}.json").read_text())
    facts = manifest["binlog"]
    files = [str(server.data / f"binlog.{n:06d}") for n in range(
        facts["number"], int(server.sql("SHOW MASTER STATUS").split()[0].split(".")[1]) + 1)]
    sock = str(server.socket)
    t0 = time.monotonic()
    server.sql("CREATE DATABASE byhand")
    unpack = ["zstd", "-dc"] if base.endswith(".zst") else ["gzip", "-dc"]
    dump = subprocess.Popen([*unpack, str(work / "backups" / "main" / base)],
                            stdout=subprocess.PIPE)
    subprocess.run(["mariadb", "--no-defaults", "-uroot", f"--socket={sock}", "byhand"],
                   stdin=dump.stdout, check=True)
    dump.wait()
    decode = subprocess.Popen(
        ["mariadb-binlog", "--no-defaults", "--database=app", "--rewrite-db=app->byhand",
         f"--start-position={facts['position']}",
         f"--stop-datetime={(at + timedelta(seconds=1)).strftime('%Y-%m-%d %H:%M:%S')}",
         *files], stdout=subprocess.PIPE, env={"TZ": "UTC"})
    subprocess.run(["mariadb", "--no-defaults", "-uroot", f"--socket={sock}", "byhand"],
                   stdin=decode.stdout, check=True)
    decode.wait()
    return time.monotonic() - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--tps", type=int, default=100)
    parser.add_argument("--kill-at", type=int, default=0,
                        help="SIGKILL the streaming worker this many seconds into the load")
    main(parser.parse_args())
