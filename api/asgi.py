"""Serve an ASGI app (the MCP SDK's streamable HTTP transport) from an aiohttp handler:
the request body streams in as `http.request` messages, the response streams out as it is
sent (server-sent events included), a client disconnect reaches the app as
`http.disconnect`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]
CHUNK = 1 << 16


async def call_asgi(app: ASGIApp, request: web.Request,
                    state: dict[str, Any] | None = None) -> web.StreamResponse:
    """`state` reaches the app as the scope's `state` (e.g. the request id)."""
    host, port = (request.url.host or "127.0.0.1"), (request.url.port or 80)
    scope: Message = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method, "scheme": request.scheme, "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode(),
        "query_string": request.query_string.encode(), "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": (request.remote or "", 0), "server": (host, port), "state": dict(state or {}),
    }
    body_done = False
    response: web.StreamResponse | None = None

    async def receive() -> Message:
        nonlocal body_done
        if not body_done:
            chunk = await request.content.read(CHUNK)
            body_done = request.content.at_eof()
            return {"type": "http.request", "body": chunk, "more_body": not body_done}
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.5)  # the app listens for a disconnect: tell it when
        return {"type": "http.disconnect"}

    gone = False  # the client went away mid-answer: the rest is dropped, quietly

    async def send(message: Message) -> None:
        nonlocal response, gone
        if gone:
            return
        try:
            await _send(message)
        except ConnectionResetError:
            gone = True

    async def _send(message: Message) -> None:
        nonlocal response
        if message["type"] == "http.response.start":
            headers: CIMultiDict[str] = CIMultiDict()
            for k, v in message.get("headers", []):
                headers.add(k.decode("latin-1"), v.decode("latin-1"))
            response = web.StreamResponse(status=message["status"], headers=headers)
            await response.prepare(request)
        elif message["type"] == "http.response.body" and response is not None:
            if body := message.get("body", b""):
                await response.write(body)
            if not message.get("more_body", False):
                await response.write_eof()

    await app(scope, receive, send)
    if response is None:
        return web.Response(status=500, text="the ASGI app sent no response")
    return response
