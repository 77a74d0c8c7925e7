"""Faults while a MySQL/MariaDB target's binlog is streamed (issue 26), on a private
mariadbd: the streaming worker process SIGKILLed alone (as the OOM killer would) under a
commit every 20 ms — the other worker takes over, the killed one's mariadb-binlog dies with
it, and the archive holds the server's binlog byte for byte with no gap."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomysql
import pytest
from redis.asyncio import Redis

from shared import rcmd
from shared.config import parse_settings
from shared.keys import Keys
from tests.conftest import make_raw_config
from tests.helpers import wait_for, wait_for_terminal, worker_process
from tests.servers.test_pitr_mysql import PW_ENV, archive_window, archived_bytes, server_file
from tests.support.mariadb import REP_PW, Server, private_mariadb

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def server() -> Iterator[Server]:
    with private_mariadb() as s:
        s.sql("CREATE TABLE t (i int PRIMARY KEY, at datetime(6) DEFAULT NOW(6))", "app")
        yield s


async def streamer(redis: Redis, prefix: str) -> str:
    return ((await rcmd.hget(redis, Keys(prefix).pitr("main", "state"), "streamer"))
            or b"").decode()


@contextlib.asynccontextmanager
async def steady_writes(server: Server) -> AsyncIterator[list[int]]:
    """A commit every 20 ms until the block ends; yields the rows committed."""
    done, rows = asyncio.Event(), []

    async def write() -> None:
        conn = await aiomysql.connect(host="127.0.0.1", port=server.port, user="rep",
                                      password=REP_PW, db="app", autocommit=True)
        try:
            i = 0
            while not done.is_set():
                async with conn.cursor() as cur:
                    await cur.execute("INSERT INTO t (i) VALUES (%s)", (i,))
                rows.append(i)
                i += 1
                await asyncio.sleep(0.02)
        finally:
            conn.close()
    task = asyncio.create_task(write())
    try:
        yield rows
    finally:
        done.set()
        await task


def receivers() -> dict[int, int]:
    """mariadb-binlog processes: pid -> parent pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            if stat[stat.index("(") + 1:stat.rindex(")")] in ("mariadb-binlog", "mysqlbinlog"):
                found[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return found


async def test_the_streaming_worker_process_killed_is_replaced_with_no_gap(
        server: Server, redis: Redis, prefix: str, tmp_path: Path) -> None:
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    targets: dict[str, Any] = {"main": {"engine": "mysql", "url": server.url(),
                                        "password_env": PW_ENV,
                                        "pitr": {"enabled": True, "ship_interval": 0.3}}}
    raw["targets"] = targets
    settings = parse_settings(raw, {PW_ENV: REP_PW}, base=tmp_path, source="<test>")
    workers = [await worker_process(tmp_path, prefix, None, targets=targets,
                                    env={PW_ENV: REP_PW}) for _ in range(2)]
    try:
        async def streaming() -> bool:
            return bool(await streamer(redis, prefix))
        await wait_for(streaming, 60, "a worker to stream the binlog")
        async with steady_writes(server) as rows:
            await asyncio.sleep(2)
            holder = await streamer(redis, prefix)
            victim = next(w for w in workers if f":{w.pid}:" in holder)
            survivor = next(w for w in workers if w is not victim)
            assert victim.pid in receivers().values(), "the holder streams"
            server.sql("FLUSH BINARY LOGS")
            victim.send_signal(signal.SIGKILL)
            await victim.wait()

            async def taken_over() -> bool:
                return f":{survivor.pid}:" in await streamer(redis, prefix)
            await wait_for(taken_over, 45, "the other worker to take the stream over")
            await asyncio.sleep(2)
        last = datetime.now(UTC)
        # the killed worker's mariadb-binlog died with it: only the survivor's streams
        assert list(receivers().values()) == [survivor.pid]

        async def caught_up() -> dict[str, Any] | None:
            w = await archive_window(settings)
            return w if w["latest"] and w["latest"] >= last.isoformat()[:23] else None
        w = await wait_for(caught_up, 30, "the window to cover the last commit")
        assert w["gaps"] == [], w["gaps"]
        assert len(rows) > 100
        held = archived_bytes(tmp_path)
        newest = max(held)
        for number, data in held.items():
            if number < newest:
                assert data == server_file(server, number), number
            else:
                assert server_file(server, number).startswith(data)
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()


def children_of(pid: int) -> dict[int, str]:
    """Live processes whose parent is `pid`: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and \
                    stat[stat.rindex(")") + 2:].split()[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace")
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if (Path("/proc") / str(pid) / "stat").read_text().split(") ", 1)[1][0] != "Z":
                out.add(pid)
    return out


@pytest.fixture
def settings(prefix: str, tmp_path: Path, server: Server) -> Any:
    from tests.servers.test_pitr_mysql import pitr_settings
    return pitr_settings(prefix, tmp_path, server)


async def test_a_worker_killed_while_it_replays_binlog_in_scratch_leaves_nothing_behind(
        server: Server, redis: Redis, prefix: str, tmp_path: Path, api: Any,
        settings: Any) -> None:
    """SIGKILL of the worker alone (as the OOM killer would) while a restore to T replays
    the binlog in its scratch server: the live database is untouched and the job says so
    (`worker_lost`, `unchanged`); the scratch mariadbd (run as mysql), the decoder and the
    client die with the worker; the scratch server's directory and the staged binlog are
    swept when a worker starts again."""
    targets: dict[str, Any] = {"main": {"engine": "mysql", "url": server.url(),
                                        "password_env": PW_ENV,
                                        "pitr": {"enabled": True, "ship_interval": 0.3}}}
    server.sql("CREATE TABLE big (k int PRIMARY KEY, v varchar(250))", "app")
    env = {PW_ENV: REP_PW}
    proc = await worker_process(tmp_path, prefix, None, targets=targets, env=env)
    try:
        await wait_for(lambda: streamer(redis, prefix), 60, "the binlog streamed")
        job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
        assert job["status"] == "succeeded", job
        for n in range(10):  # ~60 MB of row events to replay
            server.sql(f"INSERT INTO big SELECT seq, REPEAT('v', 200) FROM "
                       f"seq_{n * 30000 + 1}_to_{(n + 1) * 30000}", "app")
        server.sql("DELETE FROM big WHERE k % 2 = 0", "app")
        live = server.sql("SELECT COUNT(*), SUM(k) FROM big", "app")
        after = datetime.now(UTC)

        async def caught_up() -> bool:  # (an idle server: its streamer's word extends it)
            w = await (await api.get("/api/v1/targets/main/recovery-window")).json()
            return bool(w["latest"] and w["latest"] >= after.isoformat()[:23])
        try:
            await wait_for(caught_up, 60, "the archive to cover the last write")
        except AssertionError:  # (say where the streamer stands)
            said = await rcmd.hgetall(redis, Keys(prefix).pitr("main", "state"))
            raise AssertionError(f"{await archive_window(settings)} {said}") from None
        job_id = (await (await api.post("/api/v1/targets/main/restores", json={
            "point_in_time": "latest"})).json())["id"]
        scratch: set[int] = set()
        replaying: dict[int, str] = {}
        deadline = asyncio.get_running_loop().time() + 120
        while not replaying:
            assert asyncio.get_running_loop().time() < deadline, "never replayed"
            kids = children_of(proc.pid)
            scratch |= {p for p, cmd in kids.items() if "--skip-networking" in cmd}
            replaying = {p: c for p, c in kids.items() if "--sandbox" in c}
            await asyncio.sleep(0.05)
        tools = set(replaying) | {p for p, c in children_of(proc.pid).items()
                                  if c.startswith(("mariadb-binlog", "/usr/bin/mariadb-binlog"))}
        dirs = {d for d in Path("/tmp").glob(f"safehold-*-{proc.pid}-*")}
        assert scratch and dirs, (scratch, dirs)
        proc.send_signal(signal.SIGKILL)  # the worker alone
        await proc.wait()

        async def gone() -> bool:
            return not alive(scratch | tools)
        await wait_for(gone, 15, "the scratch server and the replay to die with the worker")
        job = await wait_for_terminal(api, job_id, timeout=90)
        err = job["error"]
        assert job["status"] == "failed" and err["code"] == "worker_lost", job
        assert err["database_state"] == "unchanged", err
        assert server.sql("SELECT COUNT(*), SUM(k) FROM big", "app") == live
        proc = await worker_process(tmp_path, prefix, None, targets=targets, env=env)
        await wait_for(lambda: not any(d.exists() for d in dirs), 30,
                       "the killed worker's work directories swept")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
