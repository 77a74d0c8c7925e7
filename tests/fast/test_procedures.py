"""The procedures' promises with no server: the real backup, verify, restore, safety
backup and rollback code of worker/procedures, run against a fake engine (tests/fakes.py),
the in-memory store and an in-memory job record. What the server suites prove on real
databases, proven here for the logic itself in milliseconds: a failed load is rolled back
from the safety backup, a load refused before it began is not, a rollback that fails too
says so with the way back, a cancel or a job taken over mid-way leaves nothing listed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.config import Settings, TargetConfig, parse_settings
from shared.errors import EngineError, RestoreFailed, SafetyBackupFailed
from shared.jobs import Job, JobKind, JobStatus, now_iso
from shared.outage import JobTakenOver
from shared.storage.catalog import Catalog
from tests.fakes import FakeEngine, MemoryJobs
from tests.memstore import MemoryStore
from worker.procedures import Procedures
from worker.progress import Progress

ORIGINAL = {b"user:1": b"ada", b"user:2": b"grace", b"order:7": b"\x00\xffbinary"}


@dataclass
class Rig:
    settings: Settings
    target: TargetConfig
    store: MemoryStore
    jobs: MemoryJobs
    procedures: Procedures
    engine: FakeEngine

    def job(self, kind: JobKind, job_id: str, **params: object) -> Job:
        return self.jobs.add(Job(id=job_id, kind=kind, target="main",
                                 status=JobStatus.RUNNING, created_at=now_iso(),
                                 params=dict(params), worker="w1"))

    async def backup(self, job_id: str = "b1") -> str:
        job = self.job(JobKind.BACKUP, job_id)
        made = await self.procedures.backup(job, self.target, self.engine, Progress(),
                                            kind="backup", compress=True)
        return str(made["filename"])

    async def restore(self, filename: str, job_id: str = "r1", **params: object
                      ) -> dict[str, object]:
        job = self.job(JobKind.RESTORE, job_id, backup=filename, **params)
        return await self.procedures.restore(job, self.target, self.engine, Progress())

    async def listed(self) -> list[str]:
        return [m["filename"] for m in await self.store.list_manifests("main")]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    settings = parse_settings({
        "storage": {"path": str(tmp_path / "backups")},
        "targets": {"main": {"engine": "redis", "url": "redis://127.0.0.1:1/0"}},
    }, {}, base=tmp_path, source="<test>")
    store, jobs = MemoryStore(), MemoryJobs()
    catalog = Catalog(settings, stores={"local": store})
    return Rig(settings, settings.targets["main"], store, jobs,
               Procedures(settings, jobs, catalog), FakeEngine(dict(ORIGINAL)))  # type: ignore[arg-type]


async def test_backup_then_restore_over_changed_data_round_trips(rig: Rig) -> None:
    name = await rig.backup()
    rig.engine.data[b"user:1"] = b"overwritten"
    rig.engine.data[b"stray"] = b"added after the backup"
    result = await rig.restore(name)
    assert rig.engine.data == ORIGINAL
    safety = str(result["safety_backup"])
    assert safety.startswith("safety_backup_redis_")
    assert sorted(await rig.listed()) == sorted([name, safety])
    # twice in a row: the same end state, a second safety backup
    again = await rig.restore(name, job_id="r2")
    assert rig.engine.data == ORIGINAL and again["safety_backup"] != safety


async def test_a_load_that_fails_half_way_is_rolled_back_from_the_safety_backup(
        rig: Rig) -> None:
    name = await rig.backup()
    rig.engine.data.clear()
    rig.engine.data[b"live"] = b"what the app wrote since"
    live = dict(rig.engine.data)
    rig.engine.fail_loads_after = [1]  # the restore dies after one key; the rollback works
    with pytest.raises(RestoreFailed) as failed:
        await rig.restore(name)
    details = failed.value.details
    assert details["database_state"] == "rolled_back"
    assert details["rollback"]["status"] == "succeeded"
    assert rig.engine.data == live  # as it was before the restore
    assert rig.engine.loads == 2
    assert any("rolling back" in m for m in rig.jobs.logged("r1"))


async def test_a_load_refused_before_it_began_is_not_rolled_back(rig: Rig) -> None:
    name = await rig.backup()
    rig.engine.data[b"live"] = b"x"
    live = dict(rig.engine.data)
    rig.engine.refuse_loads = 1
    with pytest.raises(RestoreFailed) as failed:
        await rig.restore(name)
    assert failed.value.details["database_state"] == "unchanged"
    assert failed.value.details["rollback"] is None
    assert rig.engine.data == live and rig.engine.loads == 1  # no rollback load


async def test_a_rollback_that_fails_too_says_so_and_names_the_way_back(rig: Rig) -> None:
    name = await rig.backup()
    rig.engine.fail_loads_after = [1, 0]  # the load and then the rollback both fail
    with pytest.raises(RestoreFailed) as failed:
        await rig.restore(name)
    details = failed.value.details
    assert details["database_state"] == "unknown"
    assert details["rollback"]["status"] == "failed"
    assert details["undo"]["body"] == {"backup": details["safety_backup"],
                                       "create_safety_backup": False}
    assert "ALSO failed" in failed.value.message


async def test_without_a_safety_backup_a_failed_load_is_reported_as_unknown(
        rig: Rig) -> None:
    name = await rig.backup()
    rig.engine.fail_loads_after = [1]
    with pytest.raises(RestoreFailed) as failed:
        await rig.restore(name, create_safety_backup=False)
    assert failed.value.details["database_state"] == "unknown"
    assert rig.engine.loads == 1 and await rig.listed() == [name]


async def test_a_safety_backup_that_fails_stops_the_restore_before_any_change(
        rig: Rig) -> None:
    name = await rig.backup()
    rig.engine.data[b"live"] = b"x"
    live = dict(rig.engine.data)
    rig.store.fail_writes = True  # the destination refuses the safety backup's bytes
    with pytest.raises(SafetyBackupFailed) as failed:
        await rig.restore(name)
    assert failed.value.details["database_state"] == "unchanged"
    assert rig.engine.loads == 0 and rig.engine.data == live
    assert await rig.listed() == [name]


async def test_a_backup_cancelled_mid_dump_leaves_nothing_listed(rig: Rig) -> None:
    rig.engine.dump_gate = asyncio.Event()  # the dump stops before its first key
    task = asyncio.create_task(rig.backup())
    await asyncio.wait_for(rig.engine.dumping.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await rig.listed() == []
    assert rig.store.objects_of("main") == []  # no leftover object either


async def test_a_backup_whose_job_was_taken_over_is_not_published(rig: Rig) -> None:
    """Another worker took this job for lost while it ran (a Redis outage): at its commit
    point the backup finds the record no longer its own and publishes nothing."""
    rig.engine.dump_gate = asyncio.Event()
    task = asyncio.create_task(rig.backup("b9"))
    await asyncio.wait_for(rig.engine.dumping.wait(), 5)
    rig.jobs.jobs["b9"].status = JobStatus.FAILED  # the reaper's verdict
    rig.engine.dump_gate.set()
    with pytest.raises(JobTakenOver):
        await task
    assert await rig.listed() == [] and rig.store.objects_of("main") == []


async def test_a_drill_restores_into_a_scratch_copy_and_compares_exact_counts(
        rig: Rig) -> None:
    name = await rig.backup()
    job = rig.job(JobKind.VERIFY, "v1", backup=name)
    record = await rig.procedures.verify(job, rig.target, rig.engine, Progress())
    assert record["outcome"] == "passed" and record["mode"] == "scratch-restore"
    assert record["counts_compared"] == 2 and record["rows_restored"] == 3
    assert rig.engine.scratches == {} and rig.engine.data == ORIGINAL  # dropped; live as is
    stored = await rig.store.read_manifest("main", name)
    assert stored["verification"]["outcome"] == "passed"  # type: ignore[index]


async def test_a_drill_that_restores_less_than_was_dumped_fails_and_says_what(
        rig: Rig) -> None:
    name = await rig.backup()
    rig.engine.lose_in_scratch = b"user:2"
    job = rig.job(JobKind.VERIFY, "v2", backup=name)
    with pytest.raises(EngineError) as failed:
        await rig.procedures.verify(job, rig.target, rig.engine, Progress())
    assert failed.value.code == "drill_failed"
    assert "user: 1 keys restored, 2 dumped" in failed.value.message
    stored = await rig.store.read_manifest("main", name)
    verification = stored["verification"]
    assert verification["outcome"] == "failed"  # type: ignore[index]
    assert verification["mismatches"] == {  # type: ignore[index]
        "user": {"expected": 2, "restored": 1}}
    assert rig.engine.scratches == {} and rig.engine.data == ORIGINAL


@pytest.mark.parametrize("planted", [[1, 2], {"user": "2"}, "all", {"user": True}])
async def test_a_drill_never_passes_on_counts_that_are_not_counts(rig: Rig,
                                                                  planted: object) -> None:
    """A manifest's exact_counts are read back, so checked: a shape that is no count per
    table (planted, or damaged) fails the drill and says why — it crashed the drill with
    an internal error before (`.items()` of a list), and must never pass comparing
    nothing."""
    name = await rig.backup()
    await rig.store.annotate("main", name, {"exact_counts": planted})
    job = rig.job(JobKind.VERIFY, "v3", backup=name)
    with pytest.raises(EngineError) as failed:
        await rig.procedures.verify(job, rig.target, rig.engine, Progress())
    assert failed.value.code == "drill_failed"
    stored = await rig.store.read_manifest("main", name)
    verification = stored["verification"]
    assert verification["mismatches"] == {  # type: ignore[index]
        "(manifest exact_counts)": {"expected": "a count per table", "restored": None}}
    assert "not counts" in verification["counts"]  # type: ignore[index]


def test_the_undo_of_a_restore_beside_names_that_database_never_the_live_one() -> None:
    """A failed restore over a database beside the live one says how to undo it: its safety
    backup back into that database (a plain undo would load it over the live database)."""
    from shared.jobs import undo_hint

    assert undo_hint("main", "safety_postgresql_20261207_100000.sql.gz")["body"] == {
        "backup": "safety_postgresql_20261207_100000.sql.gz", "create_safety_backup": False}
    beside = undo_hint("main", "safety_postgresql_20261207_100000.sql.gz", "app_copy")
    assert beside["body"]["into_database"] == "app_copy" and beside["body"]["replace"] is True


def test_a_lost_restore_beside_names_the_database_it_may_have_left() -> None:
    """A worker lost while restoring into a new database beside the live one: the job names
    that database (maybe created, empty or partly loaded) and how to be rid of it; a restore
    over the live database or with replace names none."""
    from shared.jobs import Job, JobKind, JobStatus
    from shared.reaper import _lost_restore

    def lost(**params: object) -> tuple[str, dict[str, object]]:
        job = Job(id="j", kind=JobKind.RESTORE, target="main", status=JobStatus.RUNNING,
                  created_at="2026-12-07T00:00:00Z", params=params,  # type: ignore[arg-type]
                  restore_state="uncommitted")
        message, extra = _lost_restore(job, "lost")
        return message, dict(extra)

    message, extra = lost(backup="b.sql.gz", into_database="app_copy")
    assert extra["leftover_database"] == "app_copy" and "drop it" in message
    assert extra["database_state"] == "unchanged"
    for params in ({"backup": "b.sql.gz"},
                   {"backup": "b.sql.gz", "into_database": "app_copy", "replace": True}):
        assert "leftover_database" not in lost(**params)[1]
    from shared.jobs import undo_hint
    hint = undo_hint(
        "main", "safety_postgresql_20261207_100000.sql.gz", None, ["app.orders"])
    assert hint["body"]["tables"] == ["app.orders"]  # the undo of a tables restore
