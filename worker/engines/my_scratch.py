"""A scratch MariaDB/MySQL server of the worker's own for a point-in-time recovery (issue
26): a backup and the binlog after it are replayed there, never on the target's server,
then the target's database is dumped from it into a regular backup.

The server holds production data and replays hostile input, so it is walled in: a
private 0700 directory, no network (a socket in that directory only), `secure_file_priv`
an empty directory of its own (no file read or written elsewhere), no plugin directory to
load from, `local_infile` off, the event scheduler off (a restored event never runs), no
binary log. It is stopped and its files removed afterwards, whatever happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

from shared import scratch
from shared.errors import EngineError
from worker.subproc import as_user, child_env, die_with_parent

SERVERS = ("/usr/sbin/mariadbd", "/usr/sbin/mysqld")


def server_binary() -> str:
    for path in SERVERS:
        if os.path.exists(path):
            return path
    found = shutil.which("mariadbd") or shutil.which("mysqld")
    if found is None:
        raise EngineError("a point-in-time restore of a MySQL/MariaDB target replays the "
                          "binlog in a scratch server on the worker: install mariadb-server "
                          "there (its client tools too)", code="pitr_tools_missing")
    return found


def _install_tool() -> str:
    tool = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if tool is None:
        raise EngineError("mariadb-install-db is missing on the worker (mariadb-server)",
                          code="pitr_tools_missing")
    return tool


@contextlib.asynccontextmanager
async def scratch_server() -> AsyncIterator[str]:
    """A scratch server in a private directory of its own, removed afterwards; yields
    the URL of its root user over its socket, `{database}` in place of the database."""
    server = server_binary()
    async with scratch.work_dir("scratch") as work, _running(server, work) as url:
        yield url


@contextlib.asynccontextmanager
async def _running(server: str, work: Path) -> AsyncIterator[str]:
    data, files, plugins = work / "data", work / "files", work / "plugins"
    for d in (data, files, plugins):
        d.mkdir(mode=0o700)
    root = os.geteuid() == 0
    user = ["--user=mysql"] if root else []
    if root:  # the server refuses to run as root: its files are the mysql user's
        for d in (work, data, files, plugins):
            shutil.chown(d, "mysql")
    install = await asyncio.create_subprocess_exec(
        _install_tool(), "--no-defaults", f"--datadir={data}", *user,
        "--auth-root-authentication-method=normal", "--skip-test-db",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=child_env({}), preexec_fn=die_with_parent)
    try:
        _, err = await install.communicate()
    finally:
        if install.returncode is None:  # cancelled meanwhile
            install.kill()
            await install.wait()
    if install.returncode != 0:
        raise EngineError(f"mariadb-install-db failed for the scratch server: "
                          f"{err.decode(errors='replace')[-300:]}", code="pitr_scratch_failed")
    sock = data / "scratch.sock"
    proc = await asyncio.create_subprocess_exec(
        # (as mysql through setpriv, not `--user`: it must die with the worker)
        *(as_user("mysql") if root else []), server, "--no-defaults", f"--datadir={data}",
        "--skip-networking",
        f"--socket={sock}", f"--pid-file={data / 'scratch.pid'}",
        f"--secure-file-priv={files}", f"--plugin-dir={plugins}", "--local-infile=0",
        "--event-scheduler=OFF", "--skip-log-bin", "--innodb-buffer-pool-size=128M",
        "--skip-symbolic-links",  # no DATA/INDEX DIRECTORY outside its own
        "--max-allowed-packet=1G", "--skip-name-resolve", f"--log-error={work / 'error.log'}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env=child_env({}), preexec_fn=die_with_parent)
    try:
        for _ in range(600):
            if sock.exists():
                break
            if proc.returncode is not None:
                raise EngineError("the scratch server stopped at its start: " + _tail(work),
                                  code="pitr_scratch_failed")
            await asyncio.sleep(0.1)
        else:
            raise EngineError("the scratch server did not start within a minute",
                              code="pitr_scratch_failed")
        yield f"mysql://root@localhost/{{database}}?unix_socket={quote(str(sock), safe='')}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _tail(work: Path) -> str:
    with contextlib.suppress(OSError):
        return (work / "error.log").read_text(errors="replace")[-400:]
    return "(no error log)"
