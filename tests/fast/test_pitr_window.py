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
