#!/usr/bin/env python3
"""Decompression bombs against every engine, through uploads and through restores of files
placed in storage by hand (manifest silent about the plain size): where each is stopped,
how long it took, and the peak extra disk (/tmp and storage) and API/worker memory.

Each bomb is a ~4-5 MB gzip file inflating to --gib GiB of content that looks like the
engine's format (a valid header, then filler). Nothing here is a test; run it by hand:

    uv run python bench/bombs.py --gib 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, safehold  # noqa: E402

MiB = 1 << 20
PG = ["-h", "127.0.0.1", "-U", "postgres"]


def bomb(parts: Iterator[bytes]) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join([*(c.compress(p) for p in parts), c.flush()])


def filler(total: int, line: bytes) -> Iterator[bytes]:
    block = line * (MiB // len(line))
    for _ in range(total // len(block)):
        yield block


def mongo_bomb(total: int) -> Iterator[bytes]:
    info = tarfile.TarInfo("app/things.bson")
    info.size = total
    yield info.tobuf(format=tarfile.USTAR_FORMAT)
    doc = b"\x10\x00\x00\x00\x10n\x00\x01\x00\x00\x00\x00" + b"\x00" * 4  # 16-byte BSON docs
    block = doc * (MiB // len(doc))
    for _ in range(total // len(block)):
        yield block


def bombs(total: int) -> dict[str, tuple[str, bytes]]:
    """engine -> (file extension, gzip bytes)."""
    pg_head = b"--\n-- PostgreSQL database dump\n--\n\nSET client_min_messages = warning;\n"
    return {
        "postgresql": ("sql", bomb([pg_head, *filler(total, b"-" * 1023 + b"\n"),
                                    b"\n-- PostgreSQL database dump complete\n"])),
        "mysql": ("sql", bomb([b"-- MariaDB dump 10.19\n", *filler(total, b"-" * 1023 + b"\n"),
                               b"\n-- Dump completed\n"])),
        "sqlite": ("db", bomb([b"SQLite format 3\x00", *filler(total, b"\x00" * 4096)])),
        "redis": ("resp", bomb([b"*5\r\n$7\r\nRESTORE\r\n$1\r\nk\r\n$1\r\n0\r\n$%d\r\n" % total,
                                *filler(total, b"\x00" * 4096), b"\r\n$7\r\nREPLACE\r\n"])),
        "mongodb": ("tar", bomb(mongo_bomb(total))),
        "neo4j": ("cypher", bomb([b"// Safehold Neo4j backup\n",
                                  *filler(total, b"//" + b"x" * 1021 + b"\n")])),
    }


class DiskPeak(threading.Thread):
    def __init__(self, paths: list[str]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.base = {p: shutil.disk_usage(p).used for p in paths}
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, max(shutil.disk_usage(p).used - self.base[p]
                                           for p in self.paths))
            time.sleep(0.02)


def upload(base: str, token: str, target: str, name: str, blob: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/gzip\r\n\r\n").encode() \
        + blob + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/api/v1/targets/{target}/uploads", data=body,
                                 method="POST", headers={
                                     "Authorization": f"Bearer {token}",
                                     "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args()
    total = int(args.gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="safehold-bombs-"))
    db = f"safehold_bombs_{uuid.uuid4().hex[:8]}"
    subprocess.run(["createdb", *PG, db], check=True)
    sqlite_path = work / "target.db"
    sqlite3.connect(sqlite_path).executescript("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    print(f"building bombs inflating to {args.gib:g} GiB each …", flush=True)
    made = bombs(total)
    targets = f"""
[targets.postgresql]
engine = "postgresql"
url = "postgresql://postgres@127.0.0.1:5432/{db}"
[targets.mysql]
engine = "mysql"
url = "mysql://root@127.0.0.1:3306/safehold_bombs_absent"
[targets.sqlite]
engine = "sqlite"
path = "{sqlite_path}"
[targets.redis]
engine = "redis"
url = "redis://127.0.0.1:6379/15"
[targets.mongodb]
engine = "mongodb"
url = "mongodb://127.0.0.1:1/app"
[targets.neo4j]
engine = "neo4j"
url = "bolt://127.0.0.1:1"
"""
    rows = []
    try:
        with safehold(work, targets) as app:
            api_rss = PeakRSS(app.api_pid)
            api_rss.start()
            for engine, (ext, blob) in made.items():
                disk = DiskPeak(["/tmp", str(work)])
                disk.start()
                t0 = time.monotonic()
                status, body = upload(app.base, app.token, engine, f"bomb.{ext}.gz", blob)
                took = time.monotonic() - t0
                disk.stop.set()
                disk.join()
                code = body.get("error", {}).get("code", "accepted")
                rows.append(("upload", engine, len(blob), f"{status} {code}", took, disk.peak))
                # the same file placed in storage by hand, then restored
                name = f"upload_{engine}_20200101_000000.{ext}.gz"
                d = work / "backups" / engine
                d.mkdir(parents=True, exist_ok=True)
                (d / name).write_bytes(blob)
                (d / f"{name}.json").write_text(json.dumps({
                    "engine": engine, "kind": "upload", "filename": name,
                    "sha256": hashlib.sha256(blob).hexdigest(), "size_bytes": len(blob),
                    "compression": {"algorithm": "gzip"}, "created_at": "2020-01-01T00:00:00Z",
                    **({"format": "resp", "databases": [15]} if engine == "redis" else {})}))
                disk = DiskPeak(["/tmp", str(work)])
                disk.start()
                t0 = time.monotonic()
                job = app.call("POST", f"/api/v1/targets/{engine}/restores?wait=600",
                               {"backup": name, "create_safety_backup": False})
                took = time.monotonic() - t0
                disk.stop.set()
                disk.join()
                err = job.get("error") or {}
                where = f"{job['status']} {err.get('code')} ({err.get('database_state')})"
                rows.append(("restore", engine, len(blob), where, took, disk.peak))
            api_rss.stop.set()
            app.rss.stop.set()
            peaks = (api_rss.peak, app.rss.peak)
    finally:
        subprocess.run(["dropdb", *PG, "--if-exists", db], check=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbombs inflating to {args.gib:g} GiB; bound = 100 × stored size\n")
    print(f"{'path':<8} {'engine':<11} {'stored':>8}  {'answer':<44} {'time':>6}  {'peak disk':>9}")
    for path, engine, size, answer, took, peak in rows:
        print(f"{path:<8} {engine:<11} {size / MiB:6.1f}MB  {answer:<44} {took:5.1f}s  "
              f"{peak / MiB:7.1f}MB")
    print(f"\npeak RSS: API {peaks[0] / MiB:.0f} MB, worker {peaks[1] / MiB:.0f} MB")


if __name__ == "__main__":
    main()
