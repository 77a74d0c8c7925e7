"""Log lines carry the job and request ids in scope; JSON lines are one object each."""

from __future__ import annotations

import asyncio
from typing import Any

from shared import logs


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
