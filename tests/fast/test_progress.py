"""Progress as clients see it: never past 100 %, never backwards, never over its total."""

from __future__ import annotations

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


