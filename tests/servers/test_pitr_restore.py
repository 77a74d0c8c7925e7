"""Restores to a point in time (issue 24) through the real worker and API, on a private
cluster: exactly the transactions committed up to T (two commits 20 ms apart), "latest",
the live database untouched until the guarded load (safety backup first), an instant
outside the window refused with the window."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared.config import Settings, parse_settings
from tests.conftest import JobWaiter
from tests.support.pgcluster import Cluster
from tests.support.pitr import app_cluster, app_config, committed_and_archived, rows, until, window

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with app_cluster() as c:
        yield c


@pytest.fixture
def raw(cluster: Cluster, prefix: str, tmp_path: Path, request: Any) -> dict[str, Any]:
    # the operator's own check, run on every drill's copy
    raw = app_config(cluster, prefix, tmp_path, verify_checks=[
        "SELECT NOT EXISTS (SELECT 1 FROM t WHERE i = 666)"])
    if request.node.originalname == "test_a_point_in_time_into_another_target":
        cluster.psql("CREATE DATABASE staging")
        raw["targets"]["staging"] = {"engine": "postgresql", "url": cluster.url(db="staging")}
    return raw


@pytest.fixture
def settings(raw: dict[str, Any], tmp_path: Path) -> Settings:
    return parse_settings(raw, {}, base=tmp_path, source="<test>")


async def test_a_restore_to_an_instant_brings_back_exactly_what_was_committed_by_then(
        cluster: Cluster, settings: Settings, worker: Any, api: Any,
        wait_job: JobWaiter) -> None:
    async def opened() -> dict[str, Any] | None:
        w = await window(api)
        return w if w["earliest"] else None
    await until(opened, 60)  # the first base is archived and its WAL follows
    conn = await asyncpg.connect(cluster.url(db="app"))
    stamps = []
    try:
        for i in range(30):  # one commit every 20 ms
            stamps.append(await conn.fetchval(
                "INSERT INTO t VALUES ($1, clock_timestamp()) RETURNING at", i))
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    k = 17
    at = stamps[k] + (stamps[k + 1] - stamps[k]) / 2  # between two commits 20 ms apart
    done = datetime.now(UTC)

    async def archived() -> bool:
        latest = (await window(api))["latest"]
        return bool(latest) and datetime.fromisoformat(latest.replace("Z", "+00:00")) > done
    await until(archived, 30)
    cluster.psql("DROP VIEW v; DROP TABLE t", db="app")  # the damage people really make

    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": at.astimezone(UTC).isoformat().replace("+00:00", "Z")})
    assert resp.status == 202, await resp.text()
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "succeeded", job.get("error")
    assert await rows(cluster) == list(range(k + 1))
    assert cluster.psql("SELECT n FROM v", db="app") == str(k + 1)  # the view is back too
    assert job["result"]["safety_backup"]  # the live (damaged) database was kept first
    assert job["result"]["warnings"][0].startswith("restored to 20")

    # "latest": the last commit archived (the restore above included) comes back
    cluster.psql("INSERT INTO t VALUES (1000, now())", db="app")
    done = datetime.now(UTC)
    await until(archived, 30)
    resp = await api.post("/api/v1/targets/main/restores", json={"point_in_time": "latest"})
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "succeeded", job.get("error")
    assert await rows(cluster) == [*range(k + 1), 1000]


async def test_an_instant_outside_the_window_is_refused_with_the_window(
        cluster: Cluster, settings: Settings, worker: Any, api: Any) -> None:
    async def opened() -> dict[str, Any] | None:
        w = await window(api)
        return w if w["earliest"] else None
    w = await until(opened, 60)
    before = datetime.fromisoformat(w["earliest"].replace("Z", "+00:00")) - timedelta(hours=1)
    for when in (before.isoformat(), "2999-01-01T00:00:00Z"):
        resp = await api.post("/api/v1/targets/main/restores", json={"point_in_time": when})
        assert resp.status == 422, await resp.text()
        error = (await resp.json())["error"]
        assert error["code"] == "outside_window" and error["window"]["earliest"]
    for bad in ("yesterday", "2026-12-07T10:00:00", ""):  # no zone: ambiguous
        resp = await api.post("/api/v1/targets/main/restores", json={"point_in_time": bad})
        assert resp.status == 400, await resp.text()
    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": "latest", "backup": "backup_postgresql_20261207_100000.sql.gz"})
    assert resp.status == 400
    assert await rows(cluster) == []  # nothing ran


async def test_the_cli_shows_the_window_and_restores_to_an_instant(
        cluster: Cluster, settings: Settings, worker: Any, api: Any, wait_job: JobWaiter,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`safehold pitr status` / `safehold pitr restore --to`, against the running API."""
    import argparse

    from api.cli.client import Client
    from api.cli.commands import COMMANDS
    from tests.conftest import token

    done = await committed_and_archived(api, cluster, 1)
    cluster.psql("DELETE FROM t", db="app")
    base = str(api.make_url("")).rstrip("/")
    async with Client(base, token(settings, "operator")) as client:
        status = argparse.Namespace(command="pitr", action="status", target="main",
                                    json=False)
        assert await COMMANDS["pitr"](client, status) == 0
        shown = capsys.readouterr().out
        assert "window   20" in shown and "USABLE" in shown and "safehold_main" in shown
        restore = argparse.Namespace(command="pitr", action="restore", target="main",
                                     to=done.isoformat(), no_safety_backup=False,
                                     terminate_connections=False, yes=True, json=True,
                                     follow=False, wait=True, into_database=None,
                                     into_target=None, tables=None, replace=False)
        assert await COMMANDS["pitr"](client, restore) == 0
    assert await rows(cluster) == [1]


async def test_an_agent_plans_and_executes_a_restore_to_an_instant_over_mcp(
        cluster: Cluster, settings: Settings, worker: Any, api: Any,
        aiohttp_server: Any) -> None:
    """MCP: the window as a tool and a resource; plan_restore with point_in_time (an
    instant outside the window refused), execute_restore with the plan's token."""
    from tests.conftest import token
    from tests.servers.test_mcp import data, mcp_client, resource, server

    done = await committed_and_archived(api, cluster, 7)
    cluster.psql("DELETE FROM t", db="app")
    async with server(aiohttp_server, settings) as base, \
            mcp_client(base, token(settings, "operator", subject="agent")) as client:
        shown = data(await client.call_tool("recovery_window", {"database_id": "main"}))
        assert shown["earliest"] and shown["latest"]
        assert (await resource(client, "resources://safehold/databases/main/recovery-window")
                )["latest"]
        refused = await client.call_tool("plan_restore", {
            "database_id": "main", "point_in_time": "2000-01-01T00:00:00Z"})
        assert refused.is_error and "outside_window" in refused.content[0].text
        plan = data(await client.call_tool("plan_restore", {
            "database_id": "main", "point_in_time": done.isoformat()}))
        assert "state at" in plan["what_happens"]
        job = data(await client.call_tool("execute_restore", {
            "confirmation_token": plan["confirmation_token"], "wait_seconds": 240}))
        assert job["status"] == "succeeded", job
    assert await rows(cluster) == [7]


async def test_a_damaged_wal_object_refuses_the_restore_and_changes_nothing(
        cluster: Cluster, settings: Settings, worker: Any, api: Any, wait_job: JobWaiter,
        tmp_path: Path) -> None:
    """A whole WAL segment damaged in storage: the restore past it fails on its checksum
    before anything is touched; the live database is as it was; from then on the object is
    listed as damaged and the window shows the hole, naming it."""
    await committed_and_archived(api, cluster, 3)
    cluster.psql("SELECT pg_switch_wal()", db="app")  # row 3's segment is complete
    archive = tmp_path / "backups" / "main.pitr"
    switched = datetime.now().timestamp()

    async def compacted() -> Path | None:
        return max((p for p in archive.glob("wal_postgresql_*.wal.zst")
                    if p.stat().st_mtime >= switched), default=None,
                   key=lambda p: p.stat().st_mtime)
    newest = await until(compacted, 30)
    done = await committed_and_archived(api, cluster, 4)  # WAL after it keeps coming
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": done.isoformat()})
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "failed", job
    assert job["error"]["database_state"] == "unchanged", job["error"]
    assert job["error"]["code"] == "archive_damaged", job["error"]
    assert newest.name in job["error"]["message"]
    assert await rows(cluster) == [3, 4]
    w = await window(api)
    assert any(newest.name in g["why"] for g in w["gaps"]), w["gaps"]
    assert w["earliest"] is None or w["earliest"] > done.isoformat()  # no base before it


async def test_a_pitr_drill_recovers_an_instant_in_scratch_and_records_it(
        cluster: Cluster, settings: Settings, worker: Any, api: Any,
        wait_job: JobWaiter) -> None:
    """POST …/verify {"point_in_time": "random"}: an instant of the window recovered in a
    scratch server, its dump restored into a scratch database, counts compared, the
    target's verify_checks run, RTO recorded on the base (the window shows it); the live
    database untouched and no backup left behind. A check that fails on the recovered copy
    fails the drill and the base says so. Bad instants are refused before any job."""
    await committed_and_archived(api, cluster, 1)
    for body, status, code in [
            ({"point_in_time": "yesterday"}, 400, "invalid_point_in_time"),
            ({"point_in_time": "2000-01-01T00:00:00Z"}, 422, "outside_window"),
            ({"point_in_time": "random",
              "backup": "backup_postgresql_20260101T000000Z.sql.gz"}, 400, "invalid_body")]:
        resp = await api.post("/api/v1/targets/main/verify", json=body)
        assert resp.status == status, (body, await resp.text())
        assert (await resp.json())["error"]["code"] == code
    resp = await api.post("/api/v1/targets/main/verify", json={"point_in_time": "random"})
    assert resp.status == 202, await resp.text()
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "succeeded", job.get("error")
    r = job["result"]
    assert r["mode"] == "pitr-scratch-recovery" and r["outcome"] == "passed", r
    assert r["counts_compared"] >= 1 and r["rto_s"] > 0, r
    assert r["checks"] and all(c["ok"] for c in r["checks"]), r
    w = await window(api)
    assert w["earliest"] <= r["point_in_time"] <= w["latest"], (r, w)
    drilled = [b["last_drill"] for b in w["bases"] if b["last_drill"]]
    assert drilled and drilled[0]["outcome"] == "passed" and drilled[0]["job"] == job["id"]
    listed = await (await api.get("/api/v1/targets/main/backups")).json()
    assert listed["backups"] == [], listed  # the drill's intermediate dump is gone

    cluster.psql("INSERT INTO t VALUES (666, now())", db="app")  # the check now fails
    await committed_and_archived(api, cluster, 2)
    resp = await api.post("/api/v1/targets/main/verify", json={"point_in_time": "latest"})
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "failed" and job["error"]["code"] == "drill_failed", job
    assert "check failed" in job["error"]["message"]
    drilled = [b["last_drill"] for b in (await window(api))["bases"] if b["last_drill"]]
    assert drilled[0]["outcome"] == "failed" and drilled[0]["job"] == job["id"], drilled
    assert await rows(cluster) == [1, 2, 666]  # a drill never touches the live database


async def test_restore_cluster_writes_a_data_directory_that_starts_as_the_server_was_at_t(
        cluster: Cluster, raw: dict[str, Any], settings: Settings, worker: Any, api: Any,
        tmp_path: Path) -> None:
    """`safehold pitr restore-cluster main --to T --data-dir D` with the config only (no
    API): D starts with PostgreSQL's own server, replays to T and promotes: the rows
    committed by T, none after. A non-empty D, a malformed instant and one outside the
    window are refused with nothing written."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from tests.helpers import write_toml
    from tests.support.pgcluster import free_port

    await committed_and_archived(api, cluster, 1)
    at = await committed_and_archived(api, cluster, 2)
    await committed_and_archived(api, cluster, 3)  # after T: must not come back
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, raw)
    root = Path(tempfile.mkdtemp(prefix="safehold-pg-restored-"))
    os.chmod(root, 0o755)
    (root / "pg").mkdir()
    shutil.chown(root / "pg", "postgres")  # its socket goes there
    restored = Cluster(root, free_port())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", "--config", str(cfg), "pitr",
                               "restore-cluster", "main", *args], capture_output=True,
                              text=True, timeout=300, check=False)
    try:
        for to, why in [("yesterday", "RFC 3339"), ("2000-01-01T00:00:00Z", "outside")]:
            out = cli("--to", to, "--data-dir", str(restored.data))
            assert out.returncode == 1 and why in out.stderr, out
            assert not restored.data.exists()
        out = cli("--to", at.isoformat(), "--data-dir", str(restored.data))
        assert out.returncode == 0, out.stderr
        assert "pg_ctl" in out.stdout and (restored.data / "recovery.signal").exists()
        assert cli("--to", "latest", "--data-dir", str(restored.data)).returncode == 1
        with open(restored.data / "postgresql.conf", "a") as f:  # the new server's place
            f.write(f"port = {restored.port}\nunix_socket_directories = '{root / 'pg'}'\n")
        restored.start()

        async def promoted() -> bool:
            return restored.psql("SELECT pg_is_in_recovery()") == "f"
        await until(promoted, 60)
        assert restored.psql("SELECT string_agg(i::text, ',' ORDER BY i) FROM t",
                             db="app") == "1,2"
        assert restored.psql("SELECT n FROM v", db="app") == "2"
    finally:
        restored.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_server_on_a_new_timeline_is_a_gap_said_and_the_archive_goes_on(
        cluster: Cluster, raw: dict[str, Any], settings: Settings, worker: Any, api: Any,
        wait_job: JobWaiter, tmp_path: Path) -> None:
    """The server is restored from its own archive (restore-cluster to T) and started in
    its place: it is on timeline 2. The streamer says so (a gap, notified once, shown in
    the window), archives timeline 2 and takes a new base at once, so the window opens
    again; a restore to "latest" brings back what was committed on the new timeline."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from tests.helpers import write_toml

    await committed_and_archived(api, cluster, 1)
    at = await committed_and_archived(api, cluster, 2)
    await committed_and_archived(api, cluster, 3)  # the branch the restore abandons
    cluster.stop()
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, raw)
    root = Path(tempfile.mkdtemp(prefix="safehold-pg-tl2-"))
    os.chmod(root, 0o755)
    (root / "pg").mkdir()
    shutil.chown(root / "pg", "postgres")
    replaced = Cluster(root, cluster.port)  # in the old server's place
    try:
        out = subprocess.run([sys.executable, "-m", "api.cli", "--config", str(cfg), "pitr",
                              "restore-cluster", "main", "--to", at.isoformat(),
                              "--data-dir", str(replaced.data)],
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        with open(replaced.data / "postgresql.conf", "a") as f:
            f.write(f"unix_socket_directories = '{root / 'pg'}'\n")
        replaced.start()

        async def promoted() -> bool:
            return replaced.psql("SELECT pg_is_in_recovery()") == "f"
        await until(promoted, 60)
        replaced.psql("INSERT INTO t VALUES (4, now())", db="app")
        done = datetime.now(UTC)

        async def reopened() -> dict[str, Any] | None:
            w = await window(api)
            ok = w["timeline"] == 2 and w["earliest"] and w["latest"] and \
                datetime.fromisoformat(w["latest"].replace("Z", "+00:00")) > done
            return w if ok else None
        w = await until(reopened, 90)
        assert any(g["why"] == "new timeline 2" for g in w["gaps"]), w["gaps"]
        assert "new timeline 2" in w["streaming"]["last_gap"]
        audit = await (await api.get("/api/v1/audit?action=pitr.gap")).json()
        assert len([e for e in audit["entries"] if "timeline 2" in e["detail"]]) == 1, audit

        resp = await api.post("/api/v1/targets/main/restores", json={"point_in_time": "latest"})
        job = await wait_job((await resp.json())["id"], timeout=240)
        assert job["status"] == "succeeded", job.get("error")
        assert replaced.psql("SELECT string_agg(i::text, ',' ORDER BY i) FROM t",
                             db="app") == "1,2,4"
    finally:
        replaced.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_point_in_time_beside_the_live_database(
        cluster: Cluster, settings: Settings, worker: Any, api: Any,
        wait_job: JobWaiter) -> None:
    """point_in_time with into_database: the state at T in a new database, the live one as
    it is now (the same path as a restore over it, ending in the beside load)."""
    at = await committed_and_archived(api, cluster, 1)
    await committed_and_archived(api, cluster, 2)
    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": at.isoformat(), "into_database": "app_then"})
    assert resp.status == 202, await resp.text()
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "succeeded", job.get("error")
    assert cluster.psql("SELECT string_agg(i::text, ',') FROM t", db="app_then") == "1"
    assert await rows(cluster) == [1, 2]
    # again into it, without replace: refused before anything is recovered or dumped
    listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": at.isoformat(), "into_database": "app_then"})
    job = await wait_job((await resp.json())["id"], timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "database_exists", job
    assert (await (await api.get("/api/v1/targets/main/backups")).json())["backups"] == listed


async def test_one_table_back_to_an_instant(
        cluster: Cluster, settings: Settings, worker: Any, api: Any,
        wait_job: JobWaiter) -> None:
    """point_in_time with tables: table t as it was at T, a table written since left as it
    is now (issue 25 on the PITR path)."""
    cluster.psql("CREATE TABLE other (i int); INSERT INTO other VALUES (1)", db="app")
    at = await committed_and_archived(api, cluster, 1)
    cluster.psql("INSERT INTO other VALUES (2)", db="app")
    await committed_and_archived(api, cluster, 2)
    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": at.isoformat(), "tables": ["public.t"]})
    assert resp.status == 202, await resp.text()
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "succeeded", job.get("error")
    assert await rows(cluster) == [1]
    assert cluster.psql("SELECT string_agg(i::text, ',' ORDER BY i) FROM other",
                        db="app") == "1,2"


async def test_a_point_in_time_into_another_target(
        cluster: Cluster, settings: Settings, worker: Any, api: Any,
        wait_job: JobWaiter) -> None:
    """point_in_time with into_target: main's state at T (recovered from main's archive)
    loaded into target staging, with staging's lock and safety backup; main as it is."""
    cluster.psql("CREATE TABLE t (i int); INSERT INTO t VALUES (-1)", db="staging")
    at = await committed_and_archived(api, cluster, 1)
    await committed_and_archived(api, cluster, 2)
    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": at.isoformat(), "into_target": "staging"})
    assert resp.status == 202, await resp.text()
    job = await wait_job((await resp.json())["id"], timeout=240)
    assert job["status"] == "succeeded", job.get("error")
    assert job["target"] == "staging" and job["result"]["safety_backup"]
    assert cluster.psql("SELECT string_agg(i::text, ',') FROM t", db="staging") == "1"
    assert await rows(cluster) == [1, 2]
