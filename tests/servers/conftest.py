"""Fixtures of the servers layer shared by several modules."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.config import Settings, parse_settings
from tests import my, pg


@pytest.fixture
async def createdb_role(pg_db: str) -> AsyncIterator[str]:
    """A role of its own that may create databases (drills' scratch copies, restores beside
    the live database) and is a member of the test role (reads and owns what it does)."""
    role = f"safehold_drill_{uuid.uuid4().hex[:8]}"
    conn = await pg.admin_conn()
    await conn.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{pg.TEST_PASSWORD}' "
                       f"IN ROLE {pg.TEST_USER}")
    await conn.close()
    yield role
    conn = await pg.admin_conn()
    for (db,) in await conn.fetch("SELECT datname FROM pg_database d JOIN pg_roles r ON "
                                  "r.oid = d.datdba WHERE r.rolname = $1", role):
        await conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
    await conn.execute(f"DROP ROLE {role}")
    await conn.close()


@pytest.fixture
async def my_db() -> AsyncIterator[str]:
    """A fresh MariaDB database the password-protected test user may use."""
    await my.ensure_user()
    name = await my.create_database()
    yield name
    await my.drop_database(name)


# ---------------------------------------------------------------------- MongoDB
PW_ENV = "SAFEHOLD_TEST_MONGO_PASSWORD"


@pytest.fixture
def dbs() -> list[str]:
    """Two fresh MongoDB database names."""
    tag = uuid.uuid4().hex[:8]
    return [f"app_{tag}", f"other_{tag}"]


def client(port: int) -> Any:
    from pymongo import AsyncMongoClient

    from tests.conftest import MONGO_PASSWORD

    return AsyncMongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                            username="root", password=MONGO_PASSWORD,
                            authMechanism="SCRAM-SHA-256")


@pytest.fixture
async def mongo(mongo_server: int, dbs: list[str]) -> AsyncIterator[Any]:
    """A client of the stand-in; `dbs` dropped afterwards."""
    c = client(mongo_server)
    yield c
    for d in dbs:
        await c.drop_database(d)
    await c.close()


def mongo_settings(prefix: str, tmp_path: Path, port: int, databases: list[str]) -> Settings:
    """Target `main`: these databases on the stand-in, as user root."""
    from tests.conftest import MONGO_PASSWORD, make_raw_config

    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {
        "engine": "mongodb", "password_env": PW_ENV,
        "url": f"mongodb://root@127.0.0.1:{port}/{','.join(databases)}"
               "?directConnection=true&authMechanism=SCRAM-SHA-256"}}
    return parse_settings(raw, {PW_ENV: MONGO_PASSWORD}, base=tmp_path, source="<test>")


REDIS_PW = "R3dis-Test-Pw-91c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_redis(tmp: Path) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmp), "--requirepass", REDIS_PW,
        "--repl-diskless-sync-delay", "0", stdout=asyncio.subprocess.DEVNULL)
    r = Redis(port=port, password=REDIS_PW)
    for _ in range(100):
        try:
            await r.ping()
            break
        except Exception:
            await asyncio.sleep(0.05)
    await r.aclose()
    return proc, port


@pytest.fixture
async def redis_port(tmp_path: Path) -> AsyncIterator[int]:
    proc, port = await start_redis(tmp_path / "redis-a")
    yield port
    with contextlib.suppress(ProcessLookupError):  # a test may have shut it down
        proc.terminate()
    await proc.wait()
