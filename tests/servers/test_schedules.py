"""Schedules: validated crontabs, a controllable clock, two workers that never double-run a
slot, catch-up once, DST days, and a scheduled backup that is pruned by its policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from shared.config import Settings, parse_settings
from shared.jobs import JobStore
from shared.keys import Keys
from tests.conftest import make_raw_config
from tests.helpers import backup, wait_for
from tests.support.schedules import with_schedule
from worker.scheduler import Scheduler


def schedulers(settings: Settings, redis: Redis, n: int = 2) -> list[Scheduler]:
    """n workers' schedulers sharing one Redis (the queue is this test's own)."""
    from arq.connections import ArqRedis

    pool = ArqRedis(connection_pool=redis.connection_pool)  # what a worker's ctx holds
    store = JobStore(pool, Keys(settings.redis.prefix), ttl=3600)
    return [Scheduler(settings, pool, store) for _ in range(n)]


async def run_clock(workers: list[Scheduler], start: datetime, end: datetime,
                    step: timedelta = timedelta(minutes=1)) -> list[str]:
    """Tick every worker at every step of a simulated clock; return the jobs created (each
    is marked done at once, as a worker would finish it before the next slot)."""
    made: list[str] = []
    now = start
    while now <= end:
        for w in workers:
            for job_id in await w.tick(now):
                made.append(job_id)
                await w.store.transition(job_id, ["queued"], "succeeded")
        now += step
    return made


async def slots_of(redis: Redis, prefix: str, ids: list[str]) -> list[str]:
    store = JobStore(redis, Keys(prefix), ttl=3600)
    return [str((await store.get(i)).params.get("scheduled_slot")) for i in ids]


async def test_two_workers_never_double_run_and_dst_days_run_once(
        redis: Redis, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    """02:30 Europe/Berlin across both 2026 DST changes, two workers ticking each minute:
    each day's slot runs exactly once — on spring-forward at 03:30 CEST (01:30 UTC), on
    fall-back at the first 02:30 (00:30 UTC)."""
    settings = with_schedule(prefix, tmp_path, None, test_env, schedule="30 2 * * *",
                             timezone="Europe/Berlin")
    workers = schedulers(settings, redis)
    berlin = ZoneInfo("Europe/Berlin")
    # first sight of the schedule: nothing runs at once
    assert await run_clock(workers, datetime(2026, 3, 27, 12, tzinfo=UTC),
                           datetime(2026, 3, 27, 12, tzinfo=UTC)) == []
    made = await run_clock(workers, datetime(2026, 3, 27, 12, 1, tzinfo=UTC),
                           datetime(2026, 3, 30, 3, tzinfo=UTC))
    assert await slots_of(redis, prefix, made) == ["2026-03-28T02:30", "2026-03-29T02:30",
                                                   "2026-03-30T02:30"]
    store = JobStore(redis, Keys(prefix), ttl=3600)
    job = await store.get(made[1])
    due = datetime.fromisoformat(job.params["scheduled_for"].replace("Z", "+00:00"))
    assert due.astimezone(berlin).strftime("%H:%M") == "03:30"
    assert due.strftime("%H:%M") == "01:30"
    assert job.requested_by["subject"] == "schedule"
    made = await run_clock(workers, datetime(2026, 10, 24, 12, tzinfo=UTC),
                           datetime(2026, 10, 26, 3, tzinfo=UTC))
    # the clock jumped from March: the missed 24 Oct slot is caught up once, then each day
    assert await slots_of(redis, prefix, made) == ["2026-10-24T02:30", "2026-10-25T02:30",
                                                   "2026-10-26T02:30"]
    job = await store.get(made[1])
    due = datetime.fromisoformat(job.params["scheduled_for"].replace("Z", "+00:00"))
    assert due.strftime("%H:%M") == "00:30"  # the first 02:30 (CEST)


async def test_catch_up_runs_the_latest_missed_slot_once(
        redis: Redis, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    """Down for three days over an hourly schedule: one job at start-up, not 72."""
    settings = with_schedule(prefix, tmp_path, None, test_env, schedule="@hourly")
    workers = schedulers(settings, redis)
    t0 = datetime(2026, 6, 1, 8, 10, tzinfo=UTC)
    assert await run_clock(workers, t0, t0) == []
    made = await run_clock(workers, t0 + timedelta(days=3), t0 + timedelta(days=3, minutes=5))
    assert await slots_of(redis, prefix, made) == ["2026-06-04T08:00"]


async def test_catch_up_none_skips_what_was_missed(
        redis: Redis, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    settings = with_schedule(prefix, tmp_path, None, test_env, schedule="@hourly",
                             catch_up="none")
    workers = schedulers(settings, redis)
    t0 = datetime(2026, 6, 1, 8, 10, tzinfo=UTC)
    await run_clock(workers, t0, t0)
    assert await run_clock(workers, t0 + timedelta(days=3),
                           t0 + timedelta(days=3, minutes=5)) == []
    made = await run_clock(workers, t0 + timedelta(days=3, minutes=50),
                           t0 + timedelta(days=3, minutes=55))
    assert await slots_of(redis, prefix, made) == ["2026-06-04T09:00"]


async def test_jitter_delays_by_a_fixed_amount(
        redis: Redis, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    settings = with_schedule(prefix, tmp_path, None, test_env, schedule="0 * * * *",
                             schedule_jitter=1800)
    workers = schedulers(settings, redis, 1)
    t0 = datetime(2026, 6, 1, 7, 59, tzinfo=UTC)
    await run_clock(workers, t0, t0)
    made = await run_clock(workers, t0, t0 + timedelta(minutes=61))
    store = JobStore(redis, Keys(prefix), ttl=3600)
    created = [datetime.fromisoformat((await store.get(i)).params["scheduled_for"]
                                      .replace("Z", "+00:00")) for i in made]
    assert len(made) == 1
    from shared.schedules import jitter

    delay = jitter("main", 1800)
    assert timedelta(0) < delay < timedelta(minutes=30)
    assert created[0] == datetime(2026, 6, 1, 8, tzinfo=UTC) + delay


async def test_scheduled_backup_runs_then_prunes_by_policy(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """A due slot becomes a real backup by `schedule`, then a prune job applies keep_last=1:
    the older backups go (audited one by one), the scheduled one and safety backups stay.
    `/schedules` shows it; `/prune?dry_run=true` plans without deleting."""
    from api.app import create_app
    from tests import pg
    from tests.conftest import bearer
    from tests.helpers import running_worker

    settings = with_schedule(prefix, tmp_path, pg_db, test_env, schedule="* * * * *",
                             retention={"keep_last": 1})
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        old = [(await backup(api))["result"]["filename"] for _ in range(2)]
        # the plan is the answer: no need to ask for a wait
        answer = await api.post("/api/v1/targets/main/prune?dry_run=true")
        assert answer.status == 200
        plan = await answer.json()
        assert plan["status"] == "succeeded", plan
        local = plan["result"]["destinations"]["local"]
        assert local["deleted"] == [old[0]]  # planned only
        assert [p["action"] for p in local["plan"]] == ["keep", "delete"]
        listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
        assert len(listed) == 2
        resp = await api.post("/api/v1/targets/main/prune",
                              headers=bearer(settings, "operator"))
        assert resp.status == 403

        # the schedule was first seen before this minute's slot (the worker's own ticks
        # may create the job first: the id is the same either way)
        await redis.hset(Keys(prefix).schedule("main"),  # type: ignore[misc]
                         "first_seen", (datetime.now(UTC) - timedelta(minutes=2)).isoformat())
        await schedulers(settings, redis, 1)[0].tick()

        async def pruned() -> Any:
            jobs = (await (await api.get("/api/v1/jobs?kind=prune")).json())["jobs"]
            done = [j for j in jobs if j["status"] == "succeeded"
                    and not j["result"]["dry_run"]]
            return done[0] if done else None

        prune_job = await wait_for(pruned, 60, "the prune after the scheduled backup")
    listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
    regular = [b for b in listed if b["kind"] == "backup"]
    assert len(regular) == 1 and regular[0]["requested_by"]["subject"] == "schedule"
    assert sorted(prune_job["result"]["destinations"]["local"]["deleted"]) == sorted(old)
    audit = (await (await api.get("/api/v1/audit?action=prune.deleted")).json())["entries"]
    assert sorted(e["backup"] for e in audit) == sorted(old)
    assert all("local:" in e["detail"] for e in audit)
    assert 'safehold_schedule_lag_seconds{target="main"}' in \
        await (await api.get("/metrics")).text()
    sched = (await (await api.get("/api/v1/schedules")).json())["schedules"]
    assert sched[0]["target"] == "main" and sched[0]["next_run"]
    assert sched[0]["last_status"] == "succeeded"


async def test_a_destination_may_keep_more_than_the_target(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """keep_last=1 on the target, keep_last=2 on an archive destination: a prune leaves one
    copy locally and two in the archive."""
    from api.app import create_app
    from tests import pg
    from tests.conftest import bearer
    from tests.helpers import running_worker

    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["storage"]["archive"] = {"type": "local", "path": str(tmp_path / "archive"),
                                 "retention": {"keep_last": 2}}
    raw["targets"]["main"].update(destinations=["local", "archive"],
                                  retention={"keep_last": 1})
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        names = [(await backup(api))["result"]["filename"] for _ in range(3)]
        job = await (await api.post("/api/v1/targets/main/prune?wait=30")).json()
    assert job["status"] == "succeeded", job.get("error")
    dests = job["result"]["destinations"]
    assert sorted(dests["local"]["deleted"]) == sorted(names[:2])
    assert dests["archive"]["deleted"] == [names[0]]
    assert dests["archive"]["policy"] == {"keep_last": 2}
    listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
    assert {b["filename"]: b["stored_on"] for b in listed} == {
        names[2]: ["local", "archive"], names[1]: ["archive"]}


async def test_prune_keeps_what_a_queued_restore_names(
        aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """A restore waiting in the queue names an old backup: the prune keeps it, and says why."""
    from api.app import create_app
    from tests import pg
    from tests.conftest import bearer
    from tests.helpers import running_worker

    settings = with_schedule(prefix, tmp_path, pg_db, test_env, retention={"keep_last": 1})
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        old, new = [(await backup(api))["result"]["filename"] for _ in range(2)]
        store = JobStore(redis, Keys(prefix), ttl=3600)  # queued, never handed to arq
        await store.create("restore", "main", {"backup": old}, {"subject": "someone"})
        job = await (await api.post("/api/v1/targets/main/prune?wait=30")).json()
    assert job["status"] == "succeeded", job.get("error")
    local = job["result"]["destinations"]["local"]
    assert local["deleted"] == []
    kept = {p["filename"]: p["reasons"] for p in local["plan"]}
    assert kept[old] == ["a queued restore names it"] and kept[new] == ["last 1"]


async def test_a_slow_backup_never_piles_up_slots(
        redis: Redis, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    """While a scheduled backup is still queued or running, its next slots are skipped."""
    settings = with_schedule(prefix, tmp_path, None, test_env, schedule="*/5 * * * *")
    w = schedulers(settings, redis, 1)[0]
    t0 = datetime(2026, 6, 1, 8, 1, tzinfo=UTC)
    await w.tick(t0)
    first = await w.tick(t0 + timedelta(minutes=5))
    assert len(first) == 1
    assert await w.tick(t0 + timedelta(minutes=10)) == []  # the first is still queued
    await w.store.transition(first[0], ["queued"], "succeeded")
    assert len(await w.tick(t0 + timedelta(minutes=15))) == 1


async def test_the_daily_prune_runs_at_its_configured_time_and_not_when_off(
        redis: Redis, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    """worker.daily_prune: a prune job within the hour after its time (in the target's
    zone), none outside it, none at all with "off"."""
    def settings_with(at: str) -> Settings:
        raw = make_raw_config(prefix, tmp_path / "backups", None, daily_prune=at)
        raw["targets"]["main"]["retention"] = {"keep_last": 2}
        return parse_settings(raw, test_env, base=tmp_path, source="<test>")

    on = settings_with("13:30")
    target = on.targets["main"]
    (s,) = schedulers(on, redis, 1)
    assert await s._daily_prune(target, datetime(2026, 12, 7, 13, 0, tzinfo=UTC)) is None
    job = await s._daily_prune(target, datetime(2026, 12, 7, 13, 45, tzinfo=UTC))
    assert job is not None and job.kind == "prune" and job.params["reason"] == "daily"
    assert await s._daily_prune(target, datetime(2026, 12, 7, 14, 31, tzinfo=UTC)) is None
    (off,) = schedulers(settings_with("off"), redis, 1)
    assert await off._daily_prune(target, datetime(2026, 12, 7, 13, 45, tzinfo=UTC)) is None


async def test_a_pitr_targets_drill_slot_also_drills_a_random_instant(
        redis: Redis, prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    """verify_schedule on a target with PITR: each slot drills the newest backup and
    recovers a random instant of the window (two verify jobs, once per slot); a target
    without PITR gets the backup drill only."""
    settings = with_schedule(prefix, tmp_path, None, test_env, verify_schedule="0 3 * * *",
                             engine="postgresql", url="postgresql://app@localhost/app",
                             pitr={"enabled": True})
    workers = schedulers(settings, redis)
    t0 = datetime(2026, 6, 1, 2, tzinfo=UTC)
    assert await run_clock(workers, t0, t0) == []
    made = await run_clock(workers, t0 + timedelta(minutes=59), t0 + timedelta(hours=2))
    store = JobStore(redis, Keys(prefix), ttl=3600)
    jobs = [await store.get(i) for i in made]
    assert [(j.kind, j.params.get("point_in_time")) for j in jobs] == [
        ("verify", None), ("verify", "random")]
    assert {j.params.get("scheduled_slot") for j in jobs} == {"2026-06-01T03:00"}
