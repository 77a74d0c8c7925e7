"""A private PostgreSQL cluster for tests that stream WAL (../shared/SERVICES.md): initdb
into a temp directory, a free loopback port, `wal_level = replica` and a replication line
of our choosing in its pg_hba.conf — never the shared server's settings. Run as the
`postgres` user (initdb and postgres refuse root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BINDIR = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "pg" / "data"

    def url(self, user: str = "postgres", db: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres", user: str = "postgres") -> str:
        out = subprocess.run(
            [str(BINDIR / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", db, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def hba(self, lines: str) -> None:
        """Replace pg_hba.conf (local trust kept) and reload."""
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n" + lines)
        self.psql("SELECT pg_reload_conf()")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(BINDIR / "postgres"), "-D",
             str(self.data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run([str(BINDIR / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                               str(self.port)], check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("the private PostgreSQL cluster did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # smart shutdown would wait for pg_receivewal
            subprocess.run(["runuser", "-u", "postgres", "--", str(BINDIR / "pg_ctl"), "-D",
                            str(self.data), "-m", "fast", "-w", "stop"],
                           capture_output=True, check=False, timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()


@contextlib.contextmanager
def private_cluster(replication_line: str = "host replication all 127.0.0.1/32 trust\n",
                    port: int | None = None) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="safehold-pg-"))
    os.chmod(root, 0o755)
    (root / "pg").mkdir()
    shutil.chown(root / "pg", "postgres")
    cluster = Cluster(root, port or free_port())
    try:
        subprocess.run(["runuser", "-u", "postgres", "--", str(BINDIR / "initdb"), "-A",
                        "trust", "-U", "postgres", "-D", str(cluster.data)],
                       capture_output=True, check=True, timeout=120)
        with open(cluster.data / "postgresql.conf", "a") as f:
            f.write(f"port = {cluster.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{root / 'pg'}'\nwal_level = replica\n"
                    "max_wal_senders = 10\nmax_replication_slots = 10\n"
                    "fsync = off\nwal_keep_size = 0\n")
        (cluster.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n" + replication_line)
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
