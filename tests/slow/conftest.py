"""Fixtures of the slow layer's browser tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import CHROMIUM
from tests.support.redis_server import PrivateRedis, free_port


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is needed (scripts/test.sh installs it with apt)")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        await b.close()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    r = PrivateRedis(free_port(), tmp_path)
    await r.start()
    yield r
    if r.proc is not None and r.proc.returncode is None:
        await r.kill()
