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
        assert tools == {"list_databases", "list_backups", "job_status", "recovery_window",
                         "backup_contents", "create_backup",
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
        inside = data(await client.call_tool("backup_contents", {"database_id": "main",
                                                                 "backup": name}))
        counted = {i["name"]: i["count"] for i in inside["items"]}
        assert inside["exact"] and inside["unit"] == "rows" and counted["public.everything"] > 0
        assert inside == await resource(
            client, f"resources://safehold/databases/main/backups/{name}/contents")
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
        # the restore resource offers restorable backups only (issue 20): no safety backups
        offered = (await resource(client, "resources://coolify/backups/databases/main/"
                                  "restore"))["latest_restorable_backups"]
        assert offered and all(b["kind"] == "backup" for b in offered), offered
        gone = data(await client.call_tool("delete_backup", {"database_id": "main",
                                                             "backup": safety[0]["filename"]}))
        assert gone["deleted"] == safety[0]["filename"]

    # every call is audited as the agent, through mcp
    entries = [json.loads(e[1][b"entry"]) for e in await redis.xrange(
        f"{settings.redis.prefix}:audit")]
    via_mcp = [e for e in entries if e.get("via") == "mcp"]
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
            assert tools == {"list_databases", "list_backups", "job_status", "recovery_window",
                             "backup_contents"}
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
    denied = {(e["action"], e["result"]) for e in entries if e.get("via") == "mcp"}
    assert ("create_backup", "denied") in denied and ("mcp.list_backups", "denied") in denied


async def test_stdio_bridge_is_the_same_server(aiohttp_server: Any, settings: Settings,
                                               redis: Any, worker: Any, tmp_path: Any) -> None:
    """`safehold mcp` as an agent launches it: a subprocess speaking MCP on stdio, bridged
    to the server's /mcp with SAFEHOLD_TOKEN — same tools for the role, progress, audit."""
    import os
    import sys
    from pathlib import Path

    from mcp import StdioServerParameters

    repo = Path(__file__).resolve().parents[2]
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
    assert any(e.get("via") == "mcp" and e.get("subject") == "agent-2"
               and e["action"] == "create_backup" for e in entries)


async def _bridge(base: str, bearer_token: str, tmp_path: Any) -> Any:
    import asyncio
    import os
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "mcp", "--url", base, cwd=str(tmp_path),
        env={**os.environ, "SAFEHOLD_TOKEN": bearer_token, "PYTHONPATH": str(repo)},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def _answer(proc: Any) -> dict[str, Any]:
    import asyncio

    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line, (await proc.stderr.read()).decode()[-2000:]
    answer: dict[str, Any] = json.loads(line)
    return answer


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "0"}}}


async def test_stdio_bridge_answers_like_a_json_rpc_server(
        aiohttp_server: Any, settings: Settings, redis: Any, tmp_path: Any) -> None:
    """Issue 20 weak spots: a non-JSON line gets a JSON-RPC parse error (-32700, id
    null), a refused token is said as such (not "Server returned an error response"), and
    the bridge exits when the agent closes its stdin."""
    import asyncio

    async with server(aiohttp_server, settings) as base:
        proc = await _bridge(base, token(settings, "viewer"), tmp_path)
        try:
            proc.stdin.write(b"this is not json\n")
            await proc.stdin.drain()
            err = await _answer(proc)
            assert err["id"] is None and err["error"]["code"] == -32700, err
            proc.stdin.write(json.dumps(INIT).encode() + b"\n")
            await proc.stdin.drain()
            assert (await _answer(proc))["result"]["serverInfo"]["name"] == "safehold"
            proc.stdin.close()  # the agent goes away
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            noise = (await proc.stderr.read()).decode()
            assert "HTTP Request" not in noise, noise  # no line per message on stderr
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

        proc = await _bridge(base, "not-a-valid-token", tmp_path)
        try:
            proc.stdin.write(json.dumps(INIT).encode() + b"\n")
            await proc.stdin.drain()
            refused = await _answer(proc)
            assert refused["id"] == 1, refused
            assert "token" in refused["error"]["message"].lower() and "refused" in \
                refused["error"]["message"].lower(), refused
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_a_read_refused_by_scope_is_a_clean_error(
        aiohttp_server: Any, settings: Settings, redis: Any,
        caplog: Any) -> None:
    """Issue 20 weak spot: a resource read a scoped token may not make was an "unexpected
    exception" (-32603 naming only the URI) with a traceback in the log."""
    from mcp.shared.exceptions import MCPError

    async with server(aiohttp_server, settings) as base:
        async with mcp_client(base, token(settings, "operator:other")) as scoped:
            for uri in ("resources://coolify/backups/databases/main",
                        "resources://coolify/backups/databases/main/restore"):
                try:
                    await scoped.read_resource(uri)
                except MCPError as exc:
                    assert "forbidden" in str(exc), exc
                else:
                    raise AssertionError(f"{uri} was read with a token scoped elsewhere")
            try:
                await scoped.read_resource("resources://safehold/jobs/no-such-job")
            except MCPError as exc:
                assert exc.error.code == -32602 and "job_not_found" in str(exc), exc
        async with mcp_client(base, token(settings, "admin")) as admin:
            # issue 22, item 8: an unknown id names the target and the configured ones
            for uri in ("resources://coolify/backups/databases/nope",
                        "resources://coolify/backups/databases/nope/restore"):
                try:
                    await admin.read_resource(uri)
                except MCPError as exc:
                    assert "target_not_found" in str(exc) and "'nope'" in str(exc) \
                        and "main" in str(exc), exc
                    assert "Error creating resource" not in str(exc)
                else:
                    raise AssertionError(f"{uri} was read")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], \
        [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


async def test_a_client_gone_mid_answer_is_no_error(
        aiohttp_server: Any, settings: Settings, redis: Any, caplog: Any, worker: Any,
        pg_db: str) -> None:
    """Issue 20 weak spot: an MCP client that disconnects while its answer is on the way
    left an ERROR traceback in the server's log."""
    import asyncio

    import aiohttp

    headers = {"Authorization": f"Bearer {token(settings, 'operator')}",
               "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-06-18"}
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "create_backup", "_meta": {"progressToken": 1},
                       "arguments": {"database_id": "main", "wait_seconds": 30}}}
    await pg.load_rich(pg_db)
    async with server(aiohttp_server, settings) as base:
        async with aiohttp.ClientSession(headers=headers) as http:
            resp = await http.post(f"{base}/mcp", json=call)
            assert resp.status == 200
            await resp.content.readany()  # the stream has started
            resp.close()  # gone while progress and the answer are on their way
        await asyncio.sleep(3.5)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert not errors, errors


async def test_mcp_calls_are_audited_like_rest_calls(
        aiohttp_server: Any, settings: Settings, redis: Any, worker: Any, pg_db: str,
        aiohttp_client: Any) -> None:
    """Issue 20 weak spots: MCP entries carry remote and request_id; plan_restore records
    the backup; a refused execute_restore names the planned target and backup; the outcome
    of an MCP-started restore names the surface (`mcp`); a scoped token asking for a job
    of a target it cannot see gets 404, not a 403 naming that target."""
    from api.app import create_app as make
    from tests.conftest import bearer

    await pg.load_rich(pg_db)
    async with server(aiohttp_server, settings) as base:
        async with mcp_client(base, token(settings, "operator", subject="agent-a")) as a, \
                mcp_client(base, token(settings, "operator", subject="agent-b")) as b:
            made = data(await a.call_tool("create_backup", {"database_id": "main"}))
            name = made["result"]["filename"]
            plan = data(await a.call_tool("plan_restore", {"database_id": "main",
                                                           "backup": name}))
            stolen = await b.call_tool("execute_restore",
                                       {"confirmation_token": plan["confirmation_token"]})
            assert stolen.is_error and "invalid_confirmation" in stolen.content[0].text
            plan = data(await a.call_tool("plan_restore", {"database_id": "main",
                                                           "backup": name}))
            done = data(await a.call_tool("execute_restore",
                                          {"confirmation_token": plan["confirmation_token"]}))
            assert done["status"] == "succeeded", done
    entries = [json.loads(e[1][b"entry"]) for e in await redis.xrange(
        f"{settings.redis.prefix}:audit")]
    mcp = [e for e in entries if e.get("via") == "mcp"]
    assert mcp and all(e.get("remote") and e.get("request_id") for e in mcp
                       if e["action"] != "job.restore" and e["action"] != "job.backup"), mcp
    planned = [e for e in mcp if e["action"] == "mcp.plan_restore"]
    assert planned and all(e["backup"] == name for e in planned), planned
    refused = [e for e in mcp if e["action"] == "mcp.execute_restore"
               and e["result"] == "denied"]
    assert refused and refused[0]["target"] == "main" and refused[0]["backup"] == name
    outcome = [e for e in entries if e["action"] == "job.restore"]
    assert outcome and outcome[0]["via"] == "mcp", outcome

    api = await aiohttp_client(make(settings))
    job_id = done["id"]
    scoped = {"Authorization": f"Bearer {token(settings, 'viewer:other')}"}
    resp = await api.get(f"/api/v1/jobs/{job_id}", headers=scoped)
    assert resp.status == 404 and "main" not in await resp.text()
    resp = await api.get(f"/api/v1/jobs/{job_id}", headers=bearer(settings, "viewer"))
    assert resp.status == 200


async def test_plan_restore_checks_its_roles_choice(
        aiohttp_server: Any, settings: Settings, redis: Any) -> None:
    async with server(aiohttp_server, settings) as base:
        async with mcp_client(base, token(settings, "operator")) as client:
            bad = await client.call_tool("plan_restore", {
                "database_id": "main", "backup": "backup_postgresql_20240101_000000.sql.gz",
                "roles": "maybe"})
            assert bad.is_error and "invalid_body" in bad.content[0].text


async def test_plan_restore_of_one_table(aiohttp_server: Any, settings: Settings, redis: Any,
                                         worker: Any, pg_db: str) -> None:
    """Issue 25: the plan names the table and says the rest is left as it is; executed, only
    that table changes; a table the backup lacks is refused at the plan."""
    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE a (i int); CREATE TABLE b (i int); "
                       "INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
    await conn.close()
    async with server(aiohttp_server, settings) as base, \
            mcp_client(base, token(settings, "admin", subject="agent-1")) as client:
        job = data(await client.call_tool("create_backup", {"database_id": "main"}))
        name = job["result"]["filename"]
        conn = await pg.user_conn(pg_db)
        await conn.execute("UPDATE a SET i = 2; UPDATE b SET i = 2")
        await conn.close()
        missing = await client.call_tool("plan_restore", {
            "database_id": "main", "backup": name, "tables": ["public.nothere"]})
        assert missing.is_error and "table_missing" in missing.content[0].text
        plan = data(await client.call_tool("plan_restore", {
            "database_id": "main", "backup": name, "tables": ["public.a"]}))
        assert "public.a" in plan["what_happens"]
        assert "everything else is left as it is" in plan["what_happens"]
        done = data(await client.call_tool("execute_restore",
                                           {"confirmation_token": plan["confirmation_token"]}))
        assert done["status"] == "succeeded", done
    conn = await pg.user_conn(pg_db)
    assert [await conn.fetchval(f"SELECT i FROM {t}") for t in "ab"] == [1, 2]
    await conn.close()
