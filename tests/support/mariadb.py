"""A private MariaDB server with binary logs for tests of MySQL point-in-time recovery
(../shared/SERVICES.md): `mariadb-install-db` into a temp directory, a free loopback port,
`--log-bin --binlog-format=ROW --server-id=1` — never the shared server's settings. Run as
the `mysql` user where the tests run as root. A user `rep` with the privileges PITR asks
for (password REP_PW) and a database `app` are made."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REP_PW = "Rep-Pw-3f1c9"
MARIADBD = "/usr/sbin/mariadbd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket(self) -> Path:
        return self.data / "m.sock"

    def url(self, user: str = "rep", db: str = "app") -> str:
        return f"mysql://{user}@127.0.0.1:{self.port}/{db}"

    def sql(self, statements: str, db: str = "") -> str:
        out = subprocess.run(
            ["mariadb", "--no-defaults", "-uroot", f"--socket={self.socket}", "-N", "-B",
             *([db] if db else []), "-e", statements],
            capture_output=True, text=True, timeout=120, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def start(self) -> None:
        user = ["--user=mysql"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", *user, f"--datadir={self.data}",
             f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.socket}",
             f"--pid-file={self.data / 'm.pid'}", f"--log-bin={self.data / 'binlog'}",
             "--binlog-format=ROW", "--server-id=1", "--innodb-buffer-pool-size=32M",
             "--skip-name-resolve", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                self.sql("SELECT 1")
                return
            if self.proc.poll() is not None:
                raise RuntimeError("mariadbd exited at start")
            time.sleep(0.1)
        raise RuntimeError("mariadbd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def private_mariadb() -> Iterator[Server]:
    if shutil.which("mariadb-install-db") is None or not Path(MARIADBD).exists():
        raise RuntimeError("mariadb-server is not installed (see ../shared/SERVICES.md)")
    root = Path(tempfile.mkdtemp(prefix="safehold-mariadb-"))
    os.chmod(root, 0o755)
    server = Server(root, free_port())
    try:
        server.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(server.data, "mysql")
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={server.data}",
             "--auth-root-authentication-method=socket", "--skip-test-db",
             *(["--user=mysql"] if os.geteuid() == 0 else [])],
            check=True, capture_output=True, timeout=120)
        server.start()
        server.sql(
            "DELETE FROM mysql.global_priv WHERE User = ''; FLUSH PRIVILEGES; "
            "CREATE DATABASE app; CREATE DATABASE other; "
            f"CREATE USER rep@'%' IDENTIFIED BY '{REP_PW}'; "
            "GRANT ALL ON app.* TO rep@'%'; GRANT ALL ON `safehold\\_drill\\_%`.* TO rep@'%'; "
            "GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO rep@'%'")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
