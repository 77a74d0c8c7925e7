"""The recovery window read from an archive's listing (shared/pitr_window.py): pieces of
WAL proven by their manifests agreeing with their names, runs and gaps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from shared import naming
from shared.pitr_window import lsn_text, pieces, runs, segment_start, window

SEG = "000000010000000000000003"
AT = datetime(2026, 12, 6, 10, tzinfo=UTC)
BASE = segment_start(SEG, 16 << 20)


def doc(lo: int, hi: int, seg: str = SEG, **over: Any) -> dict[str, Any]:
    base = segment_start(seg, 16 << 20)
    name = naming.archive_name("walpart", AT, f"{seg}_{lo:08X}-{hi:08X}")
    return {"filename": name.filename, "kind": "walpart", "timeline": int(seg[:8], 16),
            "segment": seg, "seg_bytes": 16 << 20, "raw_bytes": hi - lo,
            "start_lsn": lsn_text(base + lo), "end_lsn": lsn_text(base + hi),
            "covers_until": f"2026-12-06T10:00:{hi >> 12:02d}Z", **over}


def test_a_manifest_that_lies_about_its_wal_only_shrinks_the_window() -> None:
    """A planted or damaged archive manifest never claims WAL that is not there."""
    honest = [doc(0, 0x1000), doc(0x1000, 0x2000)]
    assert len(runs(pieces(honest))) == 1
    lies = [doc(0x2000, 0x3000, end_lsn=lsn_text(BASE + 0x900000)),  # claims more
            doc(0x2000, 0x3000, raw_bytes=5), doc(0x2000, 0x3000, seg_bytes=3),
            doc(0x2000, 0x3000, timeline=2), doc(0x2000, 0x3000, damaged="x"),
            {**doc(0x2000, 0x3000), "filename": "../../etc/passwd"}]
    for lie in lies:
        assert pieces([*honest, lie]) == pieces(honest), lie


def test_the_window_ends_where_the_continuous_wal_ends_and_says_its_gaps() -> None:
    listing = [doc(0, 0x1000), doc(0x1000, 0x3000), doc(0x5000, 0x6000)]
    w = window(listing, datetime(2026, 12, 6, 10, 1, tzinfo=UTC))
    assert w["latest"] == "2026-12-06T10:00:06.000Z" and w["lag_s"] == 54.0
    assert w["gaps"] == [{"timeline": 1, "from_lsn": lsn_text(BASE + 0x3000),
                          "to_lsn": lsn_text(BASE + 0x5000), "after": "2026-12-06T10:00:03.000Z",
                          "why": "WAL missing from the archive"}]
    assert w["earliest"] is None and w["bases"] == []
    assert window([], datetime.now(UTC))["latest"] is None
    # overlapping shipments (a successor re-sending a range) are one run
    assert len(runs(pieces([doc(0, 0x2000), doc(0x1000, 0x3000)]))) == 1


def test_a_gap_over_an_object_found_damaged_names_it() -> None:
    """An object whose bytes a reading found damaged is listed as damaged (its manifest
    fails its check from then on): the window shows the hole and names the object."""
    from shared.manifests import problems

    bad = doc(0x1000, 0x3000, read_failed={"at": "2026-12-06T10:05:00Z", "why": "sha256"})
    assert problems(bad, naming.parse_archive(bad["filename"]))[0].startswith(
        "its object was found damaged")
    stands_for = {"filename": bad["filename"], "kind": "walpart", "damaged": "found damaged"}
    w = window([doc(0, 0x1000), stands_for, doc(0x3000, 0x4000)],
               datetime(2026, 12, 6, 10, 1, tzinfo=UTC))
    assert w["gaps"][0]["why"] == f"WAL damaged in storage: {bad['filename']}", w["gaps"]


async def test_pruning_keeps_keep_days_of_window_and_the_base_that_opens_it(
        tmp_path: Any) -> None:
    """Bases consistent before the cutoff go except the newest of them; WAL before the
    oldest kept base goes; nothing newer is touched."""
    import hashlib
    from datetime import timedelta

    from shared.config import parse_settings
    from shared.keys import Keys
    from shared.notify import Notifier
    from shared.storage.catalog import Catalog
    from tests.memstore import MemoryStore
    from worker.pitr import Lease, Streamer

    settings = parse_settings({
        "storage": {"path": str(tmp_path)},
        "targets": {"main": {"engine": "postgresql", "url": "postgresql://u@h/db",
                             "pitr": {"enabled": True, "keep_days": 1}}}},
        {}, base=tmp_path, source="<t>")
    store = MemoryStore()
    catalog = Catalog(settings, stores={"local": store})
    now = datetime(2026, 12, 10, tzinfo=UTC)

    async def put(doc: dict[str, Any], at: datetime) -> None:
        name = naming.parse_archive(doc["filename"])
        pending = await store.begin("main.pitr", name, "t")
        await pending.write(b"x")
        await pending.complete(1, hashlib.sha256(b"x").hexdigest())
        await pending.write_manifest({**doc, "engine": "postgresql", "target": "main",
                                      "created_at": at.isoformat().replace("+00:00", "Z"),
                                      "sha256": hashlib.sha256(b"x").hexdigest(),
                                      "size_bytes": 1, "codecs": []})

    def base_doc(day: int, seg: int) -> tuple[dict[str, Any], datetime]:
        at = datetime(2026, 12, day, 3, tzinfo=UTC)
        start = segment_start(f"00000001000000000000{seg:04X}", 16 << 20)
        return {"filename": naming.archive_name("base", at).filename, "kind": "base",
                "timeline": 1, "start_lsn": lsn_text(start), "end_lsn": lsn_text(start + 99),
                "consistent_at": at.isoformat()}, at

    for day, seg in ((7, 1), (8, 3), (9, 5), (10, 7)):  # cutoff: 12-09 00:00
        await put(*base_doc(day, seg))
    for seg in range(1, 9):
        name = f"00000001000000000000{seg:04X}"
        at = datetime(2026, 12, 6, tzinfo=UTC) + timedelta(hours=seg * 12)
        d = doc(0, 0x1000, name)
        d["filename"] = naming.archive_name("walpart", at, f"{name}_00000000-00001000").filename
        await put(d, at)
    streamer = Streamer(settings, settings.targets["main"], None, Keys(),  # type: ignore[arg-type]
                        catalog, Notifier(settings), Lease(None, Keys(), "main", "w"))  # type: ignore[arg-type]
    await streamer.prune(now)
    left = await catalog.list_backups("main.pitr")
    kinds = sorted((m["kind"], m.get("segment") or m.get("start_lsn")) for m in left)
    # the 12-07 base went; the 12-08 base (newest before the cutoff) stays, and with it
    # the WAL from its segment (3) on; segments 1 and 2 went
    assert [k for k in kinds if k[0] == "base"] == [
        ("base", lsn_text(segment_start(f"00000001000000000000{s:04X}", 16 << 20)))
        for s in (3, 5, 7)]
    assert sorted(str(s) for k, s in kinds if k == "walpart") == [
        f"00000001000000000000{s:04X}" for s in range(3, 9)]


def test_a_replaced_server_starts_a_new_window_and_its_lsns_never_mix() -> None:
    """Another cluster at the target's address (another system identifier): its WAL has
    nothing to do with the old archive's, though the LSNs overlap; the window is the new
    server's, the old archive is a gap that says so, and a restore picks from the new
    server's WAL and bases only."""
    from datetime import timedelta

    from worker.archive_read import choose

    old = [doc(0, 0x3000, system_id="111", covers_until="2026-12-06T10:00:03Z")]
    later = naming.archive_name("walpart", AT + timedelta(minutes=5),
                                f"{SEG}_{0:08X}-{0x1000:08X}")
    new = [{**doc(0, 0x1000, system_id="222", covers_until="2026-12-06T10:05:01Z"),
            "filename": later.filename}]
    base = {"filename": naming.archive_name("base", AT).filename,
            "kind": "base", "timeline": 1, "start_lsn": lsn_text(BASE), "end_lsn":
            lsn_text(BASE + 0x100), "consistent_at": "2026-12-06T10:00:01Z",
            "size_bytes": 10, "system_id": "111"}
    w = window([*old, *new, base], datetime(2026, 12, 6, 10, 6, tzinfo=UTC))
    assert w["latest"] == "2026-12-06T10:05:01.000Z" and w["earliest"] is None, w
    assert "replaced" in str(w["gaps"][0]["why"]) and "222" in str(w["gaps"][0]["why"])
    assert w["bases"] == []  # the old server's base cannot open the new window
    import pytest

    from shared.errors import RestoreFailed
    with pytest.raises(RestoreFailed) as refused:
        choose([*old, *new, base], "2026-12-06T10:00:02Z", "main")
    assert refused.value.code == "outside_window"
