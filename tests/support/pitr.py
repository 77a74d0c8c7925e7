"""What the PITR tests share: a private cluster holding the app's database (a table `t`
and a view `v` on it), and waiting for the recovery window through the API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import make_raw_config
from tests.support.pgcluster import Cluster, private_cluster


@contextlib.contextmanager
def app_cluster() -> Iterator[Cluster]:
    with private_cluster() as c:
        c.psql("CREATE DATABASE app")
        c.psql("CREATE TABLE t (i int PRIMARY KEY, at timestamptz NOT NULL)", db="app")
        c.psql("CREATE VIEW v AS SELECT count(*) AS n FROM t", db="app")
        yield c


def app_config(cluster: Cluster, prefix: str, tmp_path: Path, **target: Any
               ) -> dict[str, Any]:
    """A raw config whose target `main` is the cluster's app database, with PITR on."""
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "postgresql", "url": cluster.url(db="app"),
                               "pitr": {"enabled": True, "ship_interval": 0.5}, **target}}
    return raw


async def window(api: Any) -> dict[str, Any]:
    resp = await api.get("/api/v1/targets/main/recovery-window")
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def until(check: Any, timeout: float) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(0.25)
    raise AssertionError("not reached in time")


async def committed_and_archived(api: Any, cluster: Cluster, row: int) -> datetime:
    """Once the window is open: a row committed, and archived; returns an instant after
    its commit."""
    async def opened() -> dict[str, Any] | None:
        w = await window(api)
        return w if w["earliest"] else None
    await until(opened, 60)
    cluster.psql(f"INSERT INTO t VALUES ({row}, now())", db="app")
    done = datetime.now(UTC)

    async def archived() -> bool:
        latest = (await window(api))["latest"]
        return bool(latest) and datetime.fromisoformat(latest.replace("Z", "+00:00")) > done
    await until(archived, 30)
    return done


async def rows(cluster: Cluster) -> list[int]:
    conn = await asyncpg.connect(cluster.url(db="app"))
    try:
        return [r["i"] for r in await conn.fetch("SELECT i FROM t ORDER BY i")]
    finally:
        await conn.close()
