"""Log lines carry the job and request ids in scope; JSON lines are one object each."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from shared import logs


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], level = saved
    root.setLevel(level)


async def test_json_lines_carry_job_and_request_ids(capsys: Any, restore_logging: Any
                                                    ) -> None:
    logs.setup("info", "json")
    log = logging.getLogger("safehold.test")

    async def job() -> None:
        logs.job_id.set("1a2b-job")
        log.info("working")
        await asyncio.create_task(child())

    async def child() -> None:
        log.warning("from a task the job started")

    async def request() -> None:
        logs.request_id.set("req-42")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    await asyncio.gather(asyncio.create_task(job()), asyncio.create_task(request()))
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    by_message = {d["message"]: d for d in lines}
    assert by_message["working"]["job"] == "1a2b-job"
    assert by_message["from a task the job started"]["job"] == "1a2b-job"
    assert by_message["failed"]["request"] == "req-42" and "job" not in by_message["failed"]
    assert "ValueError: boom" in by_message["failed"]["exception"]
    assert "job" not in by_message["outside"] and by_message["outside"]["level"] == "info"


async def test_text_lines_append_the_ids(capsys: Any, restore_logging: Any) -> None:
    logs.setup("info", "text")

    async def job() -> None:
        logs.job_id.set("j-7")
        logging.getLogger("safehold.test").info("hello")

    await asyncio.create_task(job())
    assert capsys.readouterr().err.rstrip().endswith("hello [job=j-7]")


async def test_a_malformed_request_is_one_info_line_not_an_error(
        capsys: Any, restore_logging: Any, aiohttp_server: Any) -> None:
    """A NUL in a header (or any request aiohttp's parser refuses) is answered 400 and
    logged as one INFO line: no ERROR, no traceback, whoever sends it and how often."""
    from aiohttp import web

    logs.setup("info", "text")
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    server = await aiohttp_server(app)
    for raw in (b"GET / HTTP/1.1\r\nHost: x\r\nX-Probe: \x00\r\n\r\n",
                b"GE\x00T / HTTP/1.1\r\n\r\n"):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), 10)
        writer.close()
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer
    await asyncio.sleep(0.1)
    err = capsys.readouterr().err
    assert "INFO aiohttp.server malformed HTTP request refused with 400" in err, err
    assert "Traceback" not in err and "ERROR" not in err
