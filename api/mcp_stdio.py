"""`safehold mcp`: an MCP server on stdio for agents that launch their tools as processes.

It holds no logic of its own: every message goes to a Safehold server's `/mcp` endpoint
with the bearer token from `SAFEHOLD_TOKEN` (so roles, scope and audit are the server's),
and every answer and progress notification comes back. Nothing but MCP is written to
stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import sys

import anyio
import httpx2
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server


async def bridge(base_url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=3600)) \
            as http, \
            streamable_http_client(f"{base_url.rstrip('/')}/mcp", http_client=http) \
            as (from_server, to_server), \
            stdio_server() as (from_agent, to_agent), \
            anyio.create_task_group() as tg:

        async def upstream() -> None:
            async for msg in from_agent:
                if isinstance(msg, Exception):
                    print(f"safehold mcp: unreadable message from the agent: {msg}",
                          file=sys.stderr)
                    continue
                await to_server.send(msg)
            tg.cancel_scope.cancel()  # the agent closed stdin: done

        async def downstream() -> None:
            async for msg in from_server:
                if isinstance(msg, Exception):
                    print(f"safehold mcp: {type(msg).__name__}: {msg}", file=sys.stderr)
                    continue
                await to_agent.send(msg)

        tg.start_soon(upstream)
        tg.start_soon(downstream)

