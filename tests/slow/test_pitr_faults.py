"""Faults while a PostgreSQL target's WAL is streamed (issue 24), on a private cluster:
the streaming worker process SIGKILLed alone (as the OOM killer would) under steady writes
— the other worker takes over, its tools die with it, no gap; Redis killed and started
again empty — the archive goes on with no gap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from shared import rcmd
from shared.config import Settings, parse_settings
from shared.keys import Keys
from shared.notify import Notifier
from shared.pitr_window import window
from shared.storage.catalog import Catalog
from tests.helpers import wait_for, worker_process
from tests.support.pgcluster import Cluster
from tests.support.pitr import app_cluster, app_config
from tests.support.redis_server import PrivateRedis
from worker.pitr import PitrService

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with app_cluster() as c:
        yield c


async def archive_window(settings: Settings) -> dict[str, Any]:
    catalog = Catalog(settings)
    try:
        return window(await catalog.list_backups("main.pitr"), datetime.now(UTC))
    finally:
        await catalog.close()


async def streamer(redis: Redis, prefix: str) -> str:
    return ((await rcmd.hget(redis, Keys(prefix).pitr("main", "state"), "streamer"))
            or b"").decode()


@contextlib.asynccontextmanager
async def steady_writes(cluster: Cluster) -> AsyncIterator[list[datetime]]:
    """A commit every 20 ms until the block ends; yields their commit times."""
    stamps: list[datetime] = []
    done = asyncio.Event()

    async def write() -> None:
        conn = await asyncpg.connect(cluster.url(db="app"))
        try:
            i = 0
            while not done.is_set():
                stamps.append(await conn.fetchval(
                    "INSERT INTO t VALUES ($1, clock_timestamp()) RETURNING at", i))
                i += 1
                await asyncio.sleep(0.02)
        finally:
            await conn.close()
    task = asyncio.create_task(write())
    try:
        yield stamps
    finally:
        done.set()
        await task


async def covered(settings: Settings, instant: datetime, timeout: float) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        w = await archive_window(settings)
        latest = w["latest"] and datetime.fromisoformat(w["latest"].replace("Z", "+00:00"))
        return w if latest and latest >= instant else None
    found: dict[str, Any] = await wait_for(check, timeout, "the window to cover the instant")
    return found


def receivers(port: int) -> dict[int, int]:
    """pg_receivewal processes streaming from the server on `port`: pid -> parent pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes()
            if stat[stat.index("(") + 1:stat.rindex(")")] == "pg_receivewal" and \
                    f"port={port} ".encode() in argv:
                found[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return found


async def test_the_streaming_worker_process_killed_is_replaced_with_no_gap(
        cluster: Cluster, redis: Redis, prefix: str, tmp_path: Path) -> None:
    raw = app_config(cluster, prefix, tmp_path)
    settings = parse_settings(raw, {}, base=tmp_path, source="<test>")
    workers = [await worker_process(tmp_path, prefix, None, targets=raw["targets"])
               for _ in range(2)]
    try:
        async def opened() -> bool:
            return bool((await archive_window(settings))["earliest"])
        await wait_for(opened, 90, "the first base and its WAL")
        async with steady_writes(cluster) as stamps:
            await asyncio.sleep(2)
            holder = await streamer(redis, prefix)
            victim = next(w for w in workers if f":{w.pid}:" in holder)
            survivor = next(w for w in workers if w is not victim)
            assert victim.pid in receivers(cluster.port).values(), "the holder streams"
            victim.send_signal(signal.SIGKILL)
            await victim.wait()

            async def taken_over() -> bool:
                return f":{survivor.pid}:" in await streamer(redis, prefix)
            await wait_for(taken_over, 45, "the other worker to take the stream over")
            await asyncio.sleep(3)
        # the killed worker's pg_receivewal died with it: only the survivor's streams
        assert list(receivers(cluster.port).values()) == [survivor.pid]
        w = await covered(settings, stamps[-1], 30)
        assert w["gaps"] == [], w["gaps"]
        assert len(stamps) > 100
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()


async def test_the_archive_rides_out_a_redis_restart(
        cluster: Cluster, private_redis: PrivateRedis, prefix: str, tmp_path: Path) -> None:
    raw = app_config(cluster, prefix, tmp_path)
    raw["redis"]["url"] = f"redis://127.0.0.1:{private_redis.port}/0"
    settings = parse_settings(raw, {}, base=tmp_path, source="<test>")
    redis = Redis.from_url(raw["redis"]["url"])
    catalog = Catalog(settings)
    service = PitrService(settings, redis, catalog, Notifier(settings), f"w{os.getpid()}")
    task = asyncio.create_task(service.run())
    try:
        async def opened() -> bool:
            return bool((await archive_window(settings))["earliest"])
        await wait_for(opened, 90, "the first base and its WAL")
        async with steady_writes(cluster) as stamps:
            await private_redis.kill()
            await asyncio.sleep(5)
            await private_redis.start()  # empty: the lease and the state are gone
            await asyncio.sleep(2)
        w = await covered(settings, stamps[-1], 45)
        assert w["gaps"] == [], w["gaps"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await catalog.close()
        await redis.aclose()


async def test_the_s3_destination_down_for_a_minute_stops_the_window_and_loses_nothing(
        cluster: Cluster, redis: Redis, prefix: str, tmp_path: Path, s3_server: Any,
        bucket: str) -> None:
    """The target's only destination is an S3 bucket reached through a relay, cut for
    60 s while commits go on: the window stops growing and the streamer's state says why;
    the relay back, the archive catches up past the last commit made meanwhile, with no
    gap (the slot kept the WAL on the server)."""
    from urllib.parse import urlsplit

    from tests.support.relay import Proxy

    relay = Proxy(int(urlsplit(s3_server.endpoint).port or 0))
    await relay.start()
    raw = app_config(cluster, prefix, tmp_path, destinations=["offsite"])
    raw["storage"]["offsite"] = {"type": "s3", "endpoint": f"http://127.0.0.1:{relay.port}",
                                 "bucket": bucket, "prefix": "safehold"}
    settings = parse_settings(raw, {**os.environ, "AWS_ACCESS_KEY_ID": s3_server.access_key,
                                    "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
                              base=tmp_path, source="<test>")
    catalog = Catalog(settings)
    service = PitrService(settings, redis, catalog, Notifier(settings), f"w{os.getpid()}")
    task = asyncio.create_task(service.run())
    key = Keys(prefix).pitr("main", "state")
    try:
        async def opened() -> bool:
            return bool((await archive_window(settings))["earliest"])
        await wait_for(opened, 90, "the first base and its WAL")
        await relay.cut()
        down = datetime.now(UTC)
        for i in range(30):  # a commit every 2 s for a minute
            cluster.psql(f"INSERT INTO t VALUES ({i}, now())", db="app")
            await asyncio.sleep(2)
        last = datetime.now(UTC)
        st = {k.decode(): v.decode() for k, v in (await rcmd.hgetall(redis, key)).items()}
        covers = datetime.fromisoformat(st["covers_until"].replace("Z", "+00:00"))
        assert covers < down + (last - down) / 4, st  # the window stopped growing
        assert st.get("error"), st  # and says why
        await relay.start()
        w = await covered(settings, last, 90)
        assert w["gaps"] == [], w["gaps"]
        assert int(cluster.psql("SELECT count(*) FROM t", db="app")) == 30
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await catalog.close()
        await relay.cut()
