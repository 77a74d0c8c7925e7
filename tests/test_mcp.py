"""The MCP server through the SDK's own client: over streamable HTTP at /mcp (mounted by
the API, same tokens) and over stdio (`safehold mcp`, bridged to /mcp). Resources and
templates, every tool, the two-step restore, progress notifications, role and scope."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from api.app import create_app
from shared.config import Settings
from tests import pg
from tests.conftest import token


@asynccontextmanager
async def mcp_client(base: str, bearer_token: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {bearer_token}"} if bearer_token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=120) as http, \
            Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
        yield client


def data(result: Any) -> Any:
    """A tool result's structured content (or its JSON text)."""
    if getattr(result, "structured_content", None) is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


async def resource(client: Client, uri: str) -> Any:
    got = await client.read_resource(uri)
    return json.loads(got.contents[0].text)


@asynccontextmanager
async def server(aiohttp_server: Any, settings: Settings) -> AsyncIterator[str]:
    srv = await aiohttp_server(create_app(settings))
    yield str(srv.make_url("")).rstrip("/")


async def test_resources_tools_and_the_two_step_restore(
        aiohttp_server: Any, settings: Settings, redis: Any, worker: Any, pg_db: str) -> None:
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    async with server(aiohttp_server, settings) as base, \
            mcp_client(base, token(settings, "admin", subject="agent-1")) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"list_databases", "list_backups", "job_status", "create_backup",
                         "verify_backup", "plan_restore", "execute_restore", "cancel_job",
                         "delete_backup"}
        templates = {t.uri_template for t in
                     (await client.list_resource_templates()).resource_templates}
        assert {"resources://coolify/backups/databases/{id}",
                "resources://coolify/backups/databases/{id}/restore",
                "resources://safehold/jobs/{job_id}"} <= templates
        assert "resources://safehold/databases" in {
            str(r.uri) for r in (await client.list_resources()).resources}
        assert [d["id"] for d in (await resource(client, "resources://safehold/databases"))
                ["databases"]] == ["main"]

        progress: list[float] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(done)

        job = data(await client.call_tool("create_backup", {"database_id": "main"},
                                          progress_callback=on_progress))
        assert job["status"] == "succeeded", job
        assert progress and progress[-1] == 100.0 and progress == sorted(progress)
        name = job["result"]["filename"]
        listed = await resource(client, "resources://coolify/backups/databases/main")
        assert listed["backups"][0]["filename"] == name
        options = await resource(client, "resources://coolify/backups/databases/main/restore")
        assert options["latest_restorable_backups"][0]["filename"] == name
        status = data(await client.call_tool("job_status", {"job_id": job["id"]}))
        assert status["status"] == "succeeded"
        late = await client.call_tool("cancel_job", {"job_id": job["id"]})
        assert late.is_error and "job_finished" in late.content[0].text
        assert (await resource(client, f"resources://safehold/jobs/{job['id']}"))["id"] == \
            job["id"]

        # no one-call restore: a plan, then its token; a wrong token changes nothing
        plan = data(await client.call_tool("plan_restore", {"database_id": "main",
                                                            "backup": name}))
        assert plan["backup"] == name and "safety backup" in plan["what_happens"]
        bad = await client.call_tool("execute_restore", {"confirmation_token": "nope"})
        assert bad.is_error and "invalid_confirmation" in bad.content[0].text
        async with mcp_client(base, token(settings, "admin", subject="someone-else")) as other:
            stolen = await other.call_tool("execute_restore",
                                           {"confirmation_token": plan["confirmation_token"]})
            assert stolen.is_error and "another caller" in stolen.content[0].text
        # the same subject with another token (dev tokens all say one subject; in an
        # identity provider, another login session) is another caller too
        async with mcp_client(base, token(settings, "admin", subject="agent-1")) as twin:
            stolen = await twin.call_tool("execute_restore",
                                          {"confirmation_token": plan["confirmation_token"]})
            assert stolen.is_error and "another caller" in stolen.content[0].text
        expired = data(await client.call_tool("plan_restore", {"database_id": "main",
                                                               "backup": name}))
        await redis.delete(f"{settings.redis.prefix}:mcp:plan:" + hashlib.sha256(
            expired["confirmation_token"].encode()).hexdigest())  # as after PLAN_TTL
        late = await client.call_tool("execute_restore",
                                      {"confirmation_token": expired["confirmation_token"]})
        assert late.is_error and "expired" in late.content[0].text
        conn = await pg.user_conn(pg_db)
        await conn.execute("DROP TABLE everything CASCADE")
        await conn.close()
        done = data(await client.call_tool("execute_restore",
                                           {"confirmation_token": plan["confirmation_token"]}))
        assert done["status"] == "succeeded", done
        assert await pg.fingerprint(pg_db) == before
        again = await client.call_tool("execute_restore",
                                       {"confirmation_token": plan["confirmation_token"]})
        assert again.is_error  # used once
        verified = data(await client.call_tool("verify_backup", {"database_id": "main",
                                                                 "backup": name}))
        assert verified["kind"] == "verify"
        safety = [b for b in (await resource(
            client, "resources://coolify/backups/databases/main"))["backups"]
            if b["kind"] == "safety_backup"]
        assert safety
        gone = data(await client.call_tool("delete_backup", {"database_id": "main",
                                                             "backup": safety[0]["filename"]}))
        assert gone["deleted"] == safety[0]["filename"]

    # every call is audited as the agent, through mcp
    entries = [json.loads(e[1][b"entry"]) for e in await redis.xrange(
        f"{settings.redis.prefix}:audit")]
    via_mcp = [e for e in entries if e.get("client") == "mcp"]
    assert {(e["action"], e["result"]) for e in via_mcp if e["subject"] == "someone-else"} \
        == {("mcp.execute_restore", "denied")}  # the stolen token, refused and recorded
    mine = [e for e in via_mcp if e["subject"] == "agent-1"]
    actions = [e["action"] for e in mine]
    assert {"create_backup", "create_restore", "delete_backup", "mcp.list_backups",
            "mcp.plan_restore"} <= set(actions)
    assert ("mcp.execute_restore", "rejected") in {(e["action"], e["result"]) for e in mine}
    assert actions.count("create_backup") == 1  # once, by the operation, not twice
    assert not [e for e in entries if e["action"] == "mcp_endpoint"]


async def test_roles_scope_and_no_token(aiohttp_server: Any, settings: Settings,
                                        redis: Any, worker: Any) -> None:
    async with server(aiohttp_server, settings) as base:
        async with mcp_client(base, token(settings, "viewer")) as viewer:
            tools = {t.name for t in (await viewer.list_tools()).tools}
            assert tools == {"list_databases", "list_backups", "job_status"}
            denied = await viewer.call_tool("create_backup", {"database_id": "main"})
            assert denied.is_error and "forbidden" in denied.content[0].text
        async with mcp_client(base, token(settings, "operator:other")) as scoped:
            assert data(await scoped.call_tool("list_databases", {}))["databases"] == []
            denied = await scoped.call_tool("list_backups", {"database_id": "main"})
            assert denied.is_error and "forbidden" in denied.content[0].text
        async with httpx2.AsyncClient() as http:
            r = await http.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1,
                                                     "method": "tools/list"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            # stateless: no standalone stream to leave hanging
            r = await http.get(f"{base}/mcp", headers={
                "Authorization": f"Bearer {token(settings, 'viewer')}"})
            assert r.status_code == 405
    entries = [json.loads(e[1][b"entry"]) for e in await redis.xrange(
        f"{settings.redis.prefix}:audit")]
    denied = {(e["action"], e["result"]) for e in entries if e.get("client") == "mcp"}
    assert ("create_backup", "denied") in denied and ("mcp.list_backups", "denied") in denied


async def test_stdio_bridge_is_the_same_server(aiohttp_server: Any, settings: Settings,
                                               redis: Any, worker: Any, tmp_path: Any) -> None:
    """`safehold mcp` as an agent launches it: a subprocess speaking MCP on stdio, bridged
    to the server's /mcp with SAFEHOLD_TOKEN — same tools for the role, progress, audit."""
    import os
    import sys
    from pathlib import Path

    from mcp import StdioServerParameters

    repo = Path(__file__).resolve().parents[1]
    async with server(aiohttp_server, settings) as base:
        env = {**os.environ, "SAFEHOLD_TOKEN": token(settings, "operator", subject="agent-2"),
               "PYTHONPATH": str(repo)}
        params = StdioServerParameters(command=sys.executable,
                                       args=["-m", "api.cli", "mcp", "--url", base],
                                       env=env, cwd=str(tmp_path))
        async with Client(params) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert "create_backup" in tools and "delete_backup" not in tools
            progress: list[float] = []

            async def on_progress(done: float, total: float | None, msg: str | None) -> None:
                progress.append(done)

            job = data(await client.call_tool("create_backup", {"database_id": "main"},
                                              progress_callback=on_progress))
            assert job["status"] == "succeeded" and progress and progress[-1] == 100.0
            listed = await resource(client, "resources://coolify/backups/databases/main")
            assert listed["backups"][0]["filename"] == job["result"]["filename"]
    entries = [json.loads(e[1][b"entry"]) for e in await redis.xrange(
        f"{settings.redis.prefix}:audit")]
    assert any(e.get("client") == "mcp" and e.get("subject") == "agent-2"
               and e["action"] == "create_backup" for e in entries)
