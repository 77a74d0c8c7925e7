"""Server-sent events: replay, live follow, resume with Last-Event-ID exactly once."""

from __future__ import annotations

from typing import Any

import pytest

from tests import pg
from tests.helpers import read_events, table_lock, wait_for, wait_for_terminal


async def test_resume_with_last_event_id_gets_each_event_once(api: Any, worker: Any,
                                                              pg_db: str) -> None:
    """A client that reconnects with Last-Event-ID receives every later event exactly once."""
    await pg.load_rich(pg_db)
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        job_id = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
        resp = await api.get(f"/api/v1/jobs/{job_id}/events")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await read_events(resp, until=lambda e: e["event"] == "progress" and
                                  e["data"]["progress"]["phase"] == "dumping")
        resp.close()
    assert [e["event"] for e in first][:2] == ["queued", "started"]
    await wait_for_terminal(api, job_id)

    resp = await api.get(f"/api/v1/jobs/{job_id}/events",
                         headers={"Last-Event-ID": first[-1]["id"]})
    rest = await read_events(resp)
    full = await read_events(await api.get(f"/api/v1/jobs/{job_id}/events"))

    ids = [e["id"] for e in first + rest]
    assert ids == [e["id"] for e in full]
    assert len(set(ids)) == len(ids)
    assert full[-1]["event"] == "succeeded"
    assert full[-1]["data"]["result"]["filename"].startswith("backup_postgresql_")
    kinds = {e["event"] for e in full}
    assert {"queued", "started", "phase", "progress", "succeeded"} <= kinds
    phases = [e["data"]["phase"] for e in full if e["event"] == "phase"]
    assert "dumping" in phases
    progress = [e["data"]["progress"] for e in full if e["event"] == "progress"]
    assert all({"bytes_done", "percent", "rate_bps", "eta_s", "items_done"} <= p.keys()
               for p in progress)

    # the query-parameter form (for clients that cannot set headers) behaves the same
    resp = await api.get(f"/api/v1/jobs/{job_id}/events?last_event_id={first[-1]['id']}")
    assert [e["id"] for e in await read_events(resp)] == [e["id"] for e in rest]


async def test_stream_after_the_end_closes_at_once(api: Any, worker: Any, pg_db: str) -> None:
    """Reconnecting after the terminal event ends the stream instead of hanging."""
    job = await (await api.post("/api/v1/targets/main/backups?wait=30")).json()
    full = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    resp = await api.get(f"/api/v1/jobs/{job['id']}/events",
                         headers={"Last-Event-ID": full[-1]["id"]})
    assert await read_events(resp) == []


async def test_global_stream_carries_every_jobs_transitions(api: Any, worker: Any,
                                                            pg_db: str) -> None:
    """The global stream shows each job's queued → started → succeeded, resumable by id."""
    import asyncio

    resp = await api.get("/api/v1/events")
    reader = asyncio.create_task(read_events(resp, until=lambda e: e["event"] == "succeeded"))
    await asyncio.sleep(0.3)  # the stream starts at "now"
    job = await (await api.post("/api/v1/targets/main/backups?wait=30")).json()
    events = await asyncio.wait_for(reader, 30)
    resp.close()
    mine = [e for e in events if e["data"]["job"] == job["id"]]
    assert [e["event"] for e in mine] == ["queued", "started", "succeeded"]
    resp = await api.get("/api/v1/events", headers={"Last-Event-ID": mine[0]["id"]})
    again = await read_events(resp, until=lambda e: e["event"] == "succeeded")
    resp.close()
    assert [e["id"] for e in again] == [e["id"] for e in mine[1:]]


async def test_phases_come_in_order_and_no_lock_wait_without_contention(
        api: Any, worker: Any, pg_db: str) -> None:
    """Phases and log lines arrive in the order they happened; `waiting_for_lock` (and its
    line) appear only when another job holds the target."""
    await pg.load_rich(pg_db)
    job = (await (await api.post("/api/v1/targets/main/backups?wait=60")).json())
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    phases = [e["data"]["phase"] for e in events if e["event"] == "phase"]
    assert "waiting_for_lock" not in phases
    assert phases.index("dumping") < phases.index("publishing") if "publishing" in phases \
        else "dumping" in phases
    # now with contention: the second job waits, says for whom, then dumps
    async with table_lock(pg_db, "everything", "ACCESS EXCLUSIVE"):
        first = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
        second = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
        resp = await api.get(f"/api/v1/jobs/{second}/events")
        seen = await read_events(resp, until=lambda e: e["event"] == "log")
        resp.close()
    await wait_for_terminal(api, first)
    await wait_for_terminal(api, second)
    events = await read_events(await api.get(f"/api/v1/jobs/{second}/events"))
    order = [(e["event"], e["data"].get("phase") or e["data"].get("message", ""))
             for e in events if e["event"] in ("phase", "log")]
    wait_at = order.index(("phase", "waiting_for_lock"))
    assert order[wait_at + 1] == ("log", f"waiting for job {first} on target main to finish")
    assert ("phase", "dumping") in order[wait_at + 2:]
    assert seen[-1]["data"]["message"].startswith("waiting for job")


async def test_one_caller_cannot_hold_every_stream(api: Any, pg_db: str) -> None:
    """Each open stream holds a connection of a bounded pool: a caller gets 16 at once,
    the 17th is a 429 (others are not starved), and one closing frees a place."""
    from api.context import MAX_LONG_REQUESTS_PER_SUBJECT

    opened = [await api.get("/api/v1/events") for _ in range(MAX_LONG_REQUESTS_PER_SUBJECT)]
    assert all(r.status == 200 for r in opened)
    extra = await api.get("/api/v1/events")
    assert extra.status == 429 and (await extra.json())["error"]["code"] == "too_many_streams"
    # a submit with ?wait is not refused: it answers at once, with the job to follow
    job = await api.post("/api/v1/targets/main/backups?wait=30")
    assert job.status == 202 and "not waited for" in str((await job.json())["warnings"])
    opened[0].close()

    async def freed() -> bool:
        r = await api.get("/api/v1/events")
        ok = r.status == 200
        r.close()
        return ok
    await wait_for(freed, 10, "a place to free up")
    for r in opened[1:]:
        r.close()


@pytest.mark.parametrize("bad", ["18446744073709551616-0", "0-18446744073709551616",
                                 "abc", "1-2-3", "-1-0", ""])
async def test_an_impossible_last_event_id_is_a_400_not_a_broken_stream(
        api: Any, bad: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 20 weak spot: an id past Redis's 64-bit range was answered 200, then the
    stream broke with an ERROR traceback in the log."""
    job = (await (await api.post("/api/v1/targets/main/backups")).json())["id"]
    for path in ("/api/v1/events", f"/api/v1/jobs/{job}/events"):
        for how in ({"headers": {"Last-Event-ID": bad}}, {"params": {"last_event_id": bad}}):
            resp = await api.get(path, **how)
            assert resp.status == 400, (path, how, await resp.text())
            assert (await resp.json())["error"]["code"] == "invalid_last_event_id"
    # the largest real id is fine
    resp = await api.get("/api/v1/events",
                         headers={"Last-Event-ID": "9999999999999999999-9999999999999999999"})
    assert resp.status == 200
    resp.close()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_each_role_gets_its_own_view_of_a_failed_restore(
        aiohttp_client: Any, settings: Any, redis: Any, worker: Any, pg_db: str,
        storage_dir: Any) -> None:
    """A failed restore's error quotes what the database said (user SQL can echo any
    data): on the shared event stream an operator sees it, a viewer following at the
    same moment does not (frames are cached per role, never served across roles)."""
    import asyncio

    from api.app import create_app
    from tests.conftest import bearer
    from tests.helpers import backup, publish_plain, stored_manifest

    app = create_app(settings)
    op = await aiohttp_client(app, headers=bearer(settings, "operator"))
    await pg.load_rich(pg_db)
    good = (await backup(op))["result"]["filename"]
    bad = "upload_postgresql_20200101_000000.sql.gz"
    secret = "card-4111-1111-1111-1111"
    sql = (f"SELECT 1/0 AS \"{secret}\";\n-- PostgreSQL database dump complete\n").encode()
    await publish_plain(storage_dir, bad, sql, await stored_manifest(storage_dir, good))
    op_stream = await op.get("/api/v1/events")
    viewer_stream = await op.get("/api/v1/events", headers=bearer(settings, "viewer"))
    job = (await (await op.post("/api/v1/targets/main/restores",
                                json={"backup": bad})).json())["id"]

    def ended(e: dict[str, Any]) -> bool:
        return e["data"].get("job") == job and e["event"] in ("failed", "succeeded")
    seen_op, seen_viewer = await asyncio.wait_for(asyncio.gather(
        read_events(op_stream, until=ended), read_events(viewer_stream, until=ended)), 90)
    op_view, viewer_view = seen_op[-1], seen_viewer[-1]
    assert op_view["event"] == "failed" and viewer_view["id"] == op_view["id"]
    assert "division by zero" in op_view["data"]["error"]["message"], op_view
    assert "division by zero" not in str(viewer_view) and secret not in str(viewer_view)
