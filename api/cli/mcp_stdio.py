"""`safehold mcp`: an MCP server on stdio for agents that launch their tools as processes.

It holds no logic of its own: every message goes to a Safehold server's `/mcp` endpoint
with the bearer token from `SAFEHOLD_TOKEN` (so roles, scope and audit are the server's),
and every answer and progress notification comes back. Nothing but MCP is written to
stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import logging
import sys

import anyio
import httpx2
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server

PARSE_ERROR, TOKEN_REFUSED = -32700, -32001
# one INFO line per HTTP request on stderr drowns what the bridge has to say (issue 22.8)
logging.getLogger("httpx2").setLevel(logging.WARNING)
_GENERIC = "Server returned an error response"  # the SDK's words for any HTTP error


async def bridge(base_url: str, token: str) -> None:
    """Until the agent closes stdin. A line that is not JSON-RPC gets a JSON-RPC parse
    error; a token the server refuses is said in those words (the SDK would say "Server
    returned an error response")."""
    from mcp.shared.message import SessionMessage
    from mcp.types import ErrorData, JSONRPCError

    refused: dict[str, str] = {}

    async def note_refusal(response: httpx2.Response) -> None:
        if response.status_code < 400:
            refused.clear()  # a later error is not about the token
        if response.status_code in (401, 403):
            await response.aread()
            try:
                err = response.json()["error"]
                refused["why"] = f"{err['code']}: {err['message']}"
            except (ValueError, KeyError, TypeError):
                refused["why"] = f"HTTP {response.status_code}"
            refused["status"] = str(response.status_code)

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=3600),
                                  event_hooks={"response": [note_refusal]}) as http, \
            streamable_http_client(f"{base_url.rstrip('/')}/mcp", http_client=http) \
            as (from_server, to_server), \
            stdio_server() as (from_agent, to_agent), \
            anyio.create_task_group() as tg:

        def error(id_: int | str | None, code: int, message: str) -> SessionMessage:
            return SessionMessage(JSONRPCError(jsonrpc="2.0", id=id_,
                                               error=ErrorData(code=code, message=message)))

        async def upstream() -> None:
            async for msg in from_agent:
                if isinstance(msg, Exception):
                    print(f"safehold mcp: unreadable message from the agent: {msg}",
                          file=sys.stderr)
                    await to_agent.send(error(None, PARSE_ERROR,
                                              "Parse error: not a JSON-RPC message"))
                    continue
                await to_server.send(msg)
            # the agent closed stdin: done (closing our ends lets the transports finish)
            await to_agent.aclose()
            await to_server.aclose()
            tg.cancel_scope.cancel()

        async def downstream() -> None:
            async for msg in from_server:
                if isinstance(msg, Exception):
                    print(f"safehold mcp: {type(msg).__name__}: {msg}", file=sys.stderr)
                    continue
                m = msg.message
                if isinstance(m, JSONRPCError) and m.error.message == _GENERIC and refused:
                    what = "token refused" if refused["status"] == "401" else "forbidden"
                    msg = error(m.id, TOKEN_REFUSED,
                                f"{what} by the Safehold server at {base_url} "
                                f"({refused['why']}); set SAFEHOLD_TOKEN to a valid token "
                                "(`safehold token`)")
                await to_agent.send(msg)

        tg.start_soon(upstream)
        tg.start_soon(downstream)
