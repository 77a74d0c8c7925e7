"""Progress as clients see it: never past 100 %, never backwards, never over its total."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import pg
from tests.helpers import read_events
from worker.progress import Progress


def test_an_estimate_that_was_low_is_rebased_not_overrun() -> None:
    p = Progress()
    p.set_phase("dumping", bytes_total=1000)
    p.add_bytes(900)
    first = p.snapshot()
    assert first["percent"] == 90.0
    p.add_bytes(600)  # the estimate was low
    snap = p.snapshot()
    assert snap["bytes_done"] <= snap["bytes_total"] == 1500
    assert first["percent"] <= snap["percent"] <= 99.0  # not backwards, not 100 before the end


def test_percent_never_goes_backwards_within_a_phase() -> None:
    p = Progress()
    p.set_phase("restoring", items_total=10)
    seen = []
    for done in (2, 5, 4, 9, 12):
        p.items_done = done
        seen.append(p.snapshot()["percent"])
    assert seen == sorted(seen) and max(seen) <= 99.0
    p.set_phase("indexing", bytes_total=10)  # a new phase: its own share starts from zero
    snap = p.snapshot()
    assert snap["phase_percent"] == 0.0 and snap["percent"] == seen[-1]


def test_a_restore_plan_maps_phases_into_one_rising_percent() -> None:
    """verify 0-5, safety backup 5-40 (the engine's own `dumping` inside it), load 40-100."""
    p = Progress(plan={"verifying": (0, 5), "safety_backup": (5, 40), "restoring": (40, 100)})
    seen = []
    for phase, total in (("verifying", 100), ("safety_backup", None), ("dumping", 100),
                         ("publishing", None), ("restoring", 100)):
        p.set_phase(phase, bytes_total=total)
        for done in (0, 50, 100):
            p.bytes_done = done if total else 0
            seen.append(p.snapshot()["percent"])
    assert seen == sorted(seen), seen
    assert seen[2] <= 5.0 and 5.0 <= seen[5] and seen[8] <= 40.0 and seen[-1] == 99.0


async def test_stages_and_warnings_are_recorded_in_order() -> None:
    recorded: list[str] = []

    async def on_stage(stage: str) -> None:
        recorded.append(stage)

    p = Progress(on_stage=on_stage)
    await p.enter_stage("uncommitted")
    await p.enter_stage("committing")
    p.warn("subscriptions restored disabled")
    assert recorded == ["uncommitted", "committing"] and p.stage_reached("committing")
    assert p.warnings == ["subscriptions restored disabled"]
    assert ("log", {"level": "warning", "message": "subscriptions restored disabled"}) in \
        p.outbox


async def test_percent_follows_bytes_against_a_size_learned_from_the_last_backup(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """The second backup of a target sizes its bar from the engine's estimate times the
    dump bytes per estimated byte of the first (recorded in its manifest): the total it
    shows from its first progress event is within a quarter of the real size, and the
    percent rises with the bytes instead of sitting at 99 %. A table never analysed (its
    pg_class size is 0) still gets an estimate."""
    from api.app import create_app
    from shared.config import parse_settings
    from tests.conftest import bearer, make_raw_config
    from tests.helpers import running_worker

    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat('x', 200) "
                       "AS body FROM generate_series(1, 200000) g")  # ~50 MB, not analysed
    await conn.close()
    settings = parse_settings(make_raw_config(prefix, tmp_path / "backups", pg_db,
                                              progress_interval=0.05),
                              test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        first = (await (await api.post("/api/v1/targets/main/backups?wait=120")).json())
        m1 = await (await api.get(
            f"/api/v1/targets/main/backups/{first['result']['filename']}")).json()
        assert m1["size_estimate"]["bytes"] > 0 and m1["size_estimate"]["ratio_used"] is None
        second = (await (await api.post("/api/v1/targets/main/backups?wait=120")).json())
    m2 = await (await api.get(
        f"/api/v1/targets/main/backups/{second['result']['filename']}")).json()
    ratio = m2["size_estimate"]["ratio_used"]
    assert ratio == pytest.approx(m1["raw_bytes"] / m1["size_estimate"]["bytes"], rel=0.01)
    events = await read_events(await api.get(f"/api/v1/jobs/{second['id']}/events"))
    shown = [e["data"]["progress"] for e in events if e["event"] == "progress"
             and e["data"]["progress"]["phase"] == "dumping"]
    assert shown, "no progress event while dumping"
    assert abs(shown[0]["bytes_total"] - m2["raw_bytes"]) < 0.25 * m2["raw_bytes"]
    percents = [p["percent"] for p in shown]
    assert percents == sorted(percents) and percents[0] < 90
