"""Cancel and delete around a restore, scopes on the audit log, and what viewers see of a
restore's error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from api.app import create_app
from shared.config import Settings, parse_settings
from tests import pg, procs
from tests.conftest import bearer, make_raw_config, token
from tests.helpers import (
    backup,
    publish_plain,
    read_events,
    start_backup_until_pg_dump,
    table_lock,
    wait_for,
    wait_for_terminal,
)


async def test_a_restore_waiting_for_the_target_lock_can_be_cancelled(
        api: Any, worker: Any, pg_db: str) -> None:
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    before = await pg.fingerprint(pg_db)
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        backup_id, _ = await start_backup_until_pg_dump(api, pg_db)  # holds the target lock
        restore_id = (await (await api.post("/api/v1/targets/main/restores",
                                            json={"backup": name})).json())["id"]

        async def waiting() -> bool:
            job = await (await api.get(f"/api/v1/jobs/{restore_id}")).json()
            return bool(job["progress"].get("phase") == "waiting_for_lock")

        await wait_for(waiting, 30, "the restore to wait for the lock")
        resp = await api.delete(f"/api/v1/jobs/{restore_id}")
        assert resp.status in (200, 202), await resp.text()
        job = await wait_for_terminal(api, restore_id)
    assert job["status"] == "cancelled", job
    assert job["error"]["database_state"] == "unchanged"
    assert (await wait_for_terminal(api, backup_id))["status"] == "succeeded"
    assert await pg.fingerprint(pg_db) == before


async def test_safety_backup_is_protected_while_its_restore_runs_then_cancel_rolls_back(
        api: Any, worker: Any, pg_db: str, storage_dir: Path) -> None:
    """While psql waits inside the uncommitted restore: deleting the safety backup is 409;
    cancelling is allowed (the transaction is rolled back) and the database is unchanged."""
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    conn = await pg.user_conn(pg_db)
    await conn.execute("UPDATE everything SET n = 0 WHERE id < 50")
    await conn.close()
    current = await pg.fingerprint(pg_db)
    async with table_lock(pg_db, "everything", "ACCESS SHARE"):
        job_id = (await (await api.post("/api/v1/targets/main/restores",
                                        json={"backup": name})).json())["id"]
        await wait_for(lambda: procs.find("psql", {"PGDATABASE": pg_db}), 60, "psql to start")
        job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
        safety = job["safety_backup"]
        assert safety and job["restore_state"] == "uncommitted", job
        resp = await api.delete(f"/api/v1/targets/main/backups/{safety}")
        body = await resp.json()
        assert resp.status == 409 and body["error"]["code"] == "backup_in_use", body
        resp = await api.delete(f"/api/v1/targets/main/backups/{name}")
        assert resp.status == 409
        resp = await api.delete(f"/api/v1/jobs/{job_id}")
        assert resp.status == 202, await resp.text()
        job = await wait_for_terminal(api, job_id)
    assert job["status"] == "cancelled" and job["error"]["database_state"] == "unchanged", job
    assert await pg.fingerprint(pg_db) == current
    assert (storage_dir / safety).exists()
    assert not procs.find("psql", {"PGDATABASE": pg_db})


def two_targets(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str]) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["other"] = {"engine": "sqlite", "path": str(tmp_path / "other.db")}
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


async def test_scoped_admins_and_viewers_see_only_what_is_theirs(
        aiohttp_client: Any, prefix: str, tmp_path: Path, pg_db: str, worker: Any,
        test_env: dict[str, str], storage_dir: Path) -> None:
    settings = two_targets(prefix, tmp_path, pg_db, test_env)
    client = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    await pg.load_rich(pg_db)
    good = (await backup(client))["result"]["filename"]
    resp = await client.post("/api/v1/targets/other/backups")  # audited, whatever happens
    assert resp.status == 202
    # a restore whose SQL error quotes data from the database
    manifest = __import__("json").loads((storage_dir / f"{good}.json").read_text())
    sql = (b"--\n-- PostgreSQL database dump\n--\nSELECT 'secret-looking-value'::int;\n"
           b"--\n-- PostgreSQL database dump complete\n--\n")
    bad = "upload_postgresql_20200101_000000.sql.gz"
    await publish_plain(storage_dir, bad, sql, manifest)
    job = await (await client.post("/api/v1/targets/main/restores?wait=60",
                                   json={"backup": bad})).json()
    assert job["status"] == "failed" and "secret-looking-value" in job["error"]["message"], job

    def as_(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(settings, role)}"}

    url = client.make_url
    async with ClientSession() as http:
        entries = (await (await http.get(url("/api/v1/audit?limit=1000"),
                                         headers=as_("admin:other"))).json())["entries"]
        assert entries and {e.get("target") for e in entries} == {"other"}
        everything = (await (await http.get(url("/api/v1/audit?limit=1000"),
                                            headers=as_("admin"))).json())["entries"]
        assert {"main", "other"} <= {e.get("target") for e in everything}
        seen = await (await http.get(url(f"/api/v1/jobs/{job['id']}"),
                                     headers=as_("viewer:main"))).json()
        assert seen["error"]["database_state"] == "unchanged"
        assert "secret-looking-value" not in str(seen)
        seen = await (await http.get(url(f"/api/v1/jobs/{job['id']}"),
                                     headers=as_("operator:main"))).json()
        assert "secret-looking-value" in seen["error"]["message"]
        listed = await (await http.get(url("/api/v1/jobs?limit=100"),
                                       headers=as_("viewer"))).json()
        assert all("secret-looking" not in str(j.get("error")) for j in listed["jobs"])
        # destinations: an admin of `other` only sees `other`, and no cross-target totals
        dests = (await (await http.get(url("/api/v1/destinations"),
                                       headers=as_("admin:other"))).json())["destinations"]
        assert all(d["targets"] == ["other"] and d.get("backups") is None for d in dests)
        # MCP shows a viewer the same redacted error as REST does
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        async with httpx2.AsyncClient(headers=as_("viewer:main")) as mcp_http, \
                Client(streamable_http_client(str(url("/mcp")), http_client=mcp_http)) as mcp:
            got = await mcp.call_tool("job_status", {"job_id": job["id"]})
            assert not got.is_error and "secret-looking-value" not in str(got.content)
            assert "database_state" in str(got.content)
            empty = await mcp.call_tool("list_backups", {"database_id": ""})
            assert empty.is_error and "forbidden" in empty.content[0].text
            assert "other" not in empty.content[0].text  # no names of other targets


async def test_restore_progress_rises_to_100_and_never_overruns(
        api: Any, worker: Any, pg_db: str) -> None:
    """Over SSE, a restore's `percent` only rises (verify, safety backup, load) and ends at
    100; `bytes_done` never exceeds a `bytes_total` it reports; the load's bytes move."""
    await pg.load_rich(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS t "
                       "FROM generate_series(1, 100000) g")
    await conn.close()
    name = (await backup(api))["result"]["filename"]
    job_id = (await (await api.post("/api/v1/targets/main/restores",
                                    json={"backup": name})).json())["id"]
    events = await read_events(await api.get(f"/api/v1/jobs/{job_id}/events"))
    progress = [e["data"]["progress"] for e in events if e["event"] == "progress"]
    final = [e["data"] for e in events if e["event"] == "succeeded"]
    assert final, events[-1]
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and all(0 <= x <= 100 for x in percents), percents
    assert all(p["bytes_total"] is None or p["bytes_done"] <= p["bytes_total"]
               for p in progress)
    job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
    done = job["progress"]
    assert done["percent"] == 100.0 and done["phase"] == "restoring", done
    assert 0 < done["bytes_done"] <= done["bytes_total"], done  # the load's bytes were counted
