"""A target's recovery window, read from its archive (`<target>.pitr`): what WAL every
listed object proves it holds, where it is continuous, and until when.

Every manifest is hostile input until it agrees with its own name (the segment and byte
range are in the name; the LSNs and sizes in the manifest must match them), so a planted or
damaged manifest can only ever make the window smaller — shown as a gap — never claim WAL
that is not there. The API, the page, MCP, the CLI and /metrics all read this one answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from shared import naming
from shared.errors import InvalidBackupName

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")


def lsn_int(text: str) -> int:
    m = _LSN.match(text)
    if not m:
        raise ValueError(f"not an LSN: {text[:40]!r}")
    return (int(m[1], 16) << 32) | int(m[2], 16)


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_name(timeline: int, lsn: int, seg_bytes: int) -> str:
    """PostgreSQL's name of the WAL segment holding `lsn` (XLogFileName)."""
    seg = lsn // seg_bytes
    per_id = 0x100000000 // seg_bytes
    return f"{timeline:08X}{seg // per_id:08X}{seg % per_id:08X}"


def segment_start(name: str, seg_bytes: int) -> int:
    """The LSN a segment name begins at (its timeline aside)."""
    per_id = 0x100000000 // seg_bytes
    return (int(name[8:16], 16) * per_id + int(name[16:24], 16)) * seg_bytes


@dataclass(frozen=True)
class ArchivedPiece:
    """WAL bytes [start, end) of one timeline that an archive object holds."""

    filename: str
    kind: str  # "wal" (a whole segment) or "walpart"
    timeline: int
    segment: str
    start: int  # LSN
    end: int  # LSN
    covers_until: datetime | None  # all the server had flushed by then is archived
    created_at: datetime
    system_id: str
    seg_bytes: int


def _when(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at.astimezone(UTC) if at.tzinfo is not None else None


def piece(doc: Mapping[str, object]) -> ArchivedPiece | None:
    """The WAL an archive manifest proves, or None (not WAL, damaged, or disagreeing with
    its own name)."""
    if doc.get("damaged") or doc.get("kind") not in ("wal", "walpart"):
        return None
    try:
        name = naming.parse_archive(str(doc.get("filename")))
        seg_bytes = doc.get("seg_bytes")
        if not isinstance(seg_bytes, int) or seg_bytes < 1 << 20 or seg_bytes & (seg_bytes - 1):
            return None
        segment = name.ref[:24]
        lo, hi = (0, seg_bytes) if name.kind == "wal" else (
            int(name.ref[25:33], 16), int(name.ref[34:42], 16))
        base = segment_start(segment, seg_bytes)
        start, end = lsn_int(str(doc.get("start_lsn"))), lsn_int(str(doc.get("end_lsn")))
        timeline = int(segment[:8], 16)
        if (start, end) != (base + lo, base + hi) or not lo < hi <= seg_bytes or \
                doc.get("timeline") != timeline or doc.get("segment") != segment:
            return None
        raw = doc.get("raw_bytes")
        if raw is not None and raw != hi - lo:
            return None
    except (ValueError, IndexError, InvalidBackupName):
        return None
    return ArchivedPiece(filename=name.filename, kind=name.kind, timeline=timeline,
                         segment=segment, start=start, end=end,
                         covers_until=_when(doc.get("covers_until")),
                         created_at=name.created_at, system_id=str(doc.get("system_id")),
                         seg_bytes=seg_bytes)


def named_range(filename: str, seg_bytes: int) -> tuple[int, int, int] | None:
    """(timeline, start, end) of the WAL a wal/walpart object's name says it holds — all
    that is known of a damaged one."""
    try:
        name = naming.parse_archive(filename)
        if name.kind not in ("wal", "walpart"):
            return None
        segment = name.ref[:24]
        lo, hi = (0, seg_bytes) if name.kind == "wal" else (
            int(name.ref[25:33], 16), int(name.ref[34:42], 16))
        base = segment_start(segment, seg_bytes)
        return int(segment[:8], 16), base + lo, base + hi
    except (ValueError, IndexError, InvalidBackupName):
        return None


def pieces(listing: Iterable[Mapping[str, object]]) -> list[ArchivedPiece]:
    """Every piece of WAL a listing proves, by timeline and position."""
    found = [p for doc in listing if (p := piece(doc)) is not None]
    return sorted(found, key=lambda p: (p.timeline, p.start, -p.end))


@dataclass(frozen=True)
class ArchivedBase:
    """A base backup in the archive: restorable from `consistent_at` on, given WAL from
    its start."""

    filename: str
    timeline: int
    start: int  # LSN
    end: int  # LSN
    consistent_at: datetime
    created_at: datetime
    size_bytes: int
    last_drill: dict[str, object] | None = None  # the last PITR drill that started here
    system_id: str = ""


DRILL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "point_in_time": str, "outcome": str, "at": str, "job": str, "error": str,
    "rto_s": (int, float)}


def _drill(value: object) -> dict[str, object] | None:
    """A base's `last_drill` as recorded by a drill: only its known fields, each of its
    type and short (a manifest is read back, never believed)."""
    if not isinstance(value, dict):
        return None
    out = {k: (v[:80] if isinstance(v, str) else v) for k, v in value.items()
           if k in DRILL_FIELDS and isinstance(v, DRILL_FIELDS[k]) and not isinstance(v, bool)}
    return out if "outcome" in out else None


def base(doc: Mapping[str, object]) -> ArchivedBase | None:
    if doc.get("damaged") or doc.get("kind") != "base":
        return None
    try:
        name = naming.parse_archive(str(doc.get("filename")))
        start, end = lsn_int(str(doc.get("start_lsn"))), lsn_int(str(doc.get("end_lsn")))
    except (ValueError, InvalidBackupName):
        return None
    timeline, at, size = doc.get("timeline"), _when(doc.get("consistent_at")), doc.get(
        "size_bytes")
    if name.kind != "base" or not isinstance(timeline, int) or at is None or \
            not isinstance(size, int) or not start <= end:
        return None
    return ArchivedBase(filename=name.filename, timeline=timeline, start=start, end=end,
                        consistent_at=at, created_at=name.created_at, size_bytes=size,
                        last_drill=_drill(doc.get("last_drill")),
                        system_id=str(doc.get("system_id") or ""))


def bases(listing: Iterable[Mapping[str, object]]) -> list[ArchivedBase]:
    """The archive's base backups, oldest first."""
    return sorted((b for doc in listing if (b := base(doc)) is not None),
                  key=lambda b: b.start)


@dataclass(frozen=True)
class Run:
    """Continuous WAL of one timeline."""

    timeline: int
    start: int
    end: int
    covers_until: datetime | None
    first_at: datetime  # when its first piece was archived


def runs(found: list[ArchivedPiece]) -> list[Run]:
    """Continuous stretches of archived WAL; between two of them, a gap."""
    out: list[Run] = []
    for p in found:
        last = out[-1] if out else None
        if last is not None and last.timeline == p.timeline and p.start <= last.end:
            if p.end > last.end or (p.end == last.end and p.covers_until and (
                    last.covers_until is None or p.covers_until > last.covers_until)):
                covers = p.covers_until or last.covers_until
                if last.covers_until and covers and last.covers_until > covers:
                    covers = last.covers_until
                out[-1] = Run(last.timeline, last.start, max(last.end, p.end), covers,
                              last.first_at)
            continue
        out.append(Run(p.timeline, p.start, p.end, p.covers_until, p.created_at))
    return out


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class Current:
    """The archive of the server streamed now: WAL and bases of one system (a server
    replaced at the same address — a new cluster, another machine — starts a new archive:
    its LSNs have nothing to do with the old ones), and what an older system left."""

    pieces: list[ArchivedPiece]
    bases: list[ArchivedBase]
    replaced: list[dict[str, object]]  # gaps: one per system that came before


def current(listing: Iterable[Mapping[str, object]]) -> Current:
    listing = list(listing)
    held = pieces(listing)
    newest = max(held, key=lambda p: (p.created_at, p.end), default=None)
    if newest is None:
        return Current([], bases(listing), [])
    system = newest.system_id
    before: dict[str, datetime | None] = {}
    for p in held:
        if p.system_id != system:
            ends = before.get(p.system_id)
            before[p.system_id] = max((t for t in (ends, p.covers_until) if t), default=None)
    replaced: list[dict[str, object]] = [
        {"timeline": None, "from_lsn": None, "to_lsn": None, "after": _iso(ends),
         "why": f"the server was replaced (system identifier {system}; the archive before "
                f"it is of {other})"}
        for other, ends in sorted(before.items(), key=lambda kv: kv[1] or datetime.min.replace(
            tzinfo=UTC))]
    return Current([p for p in held if p.system_id == system],
                   [b for b in bases(listing) if b.system_id in ("", system)], replaced)


def window(listing: Iterable[Mapping[str, object]], now: datetime) -> dict[str, object]:
    """`GET …/recovery-window`'s answer from the archive's listing: the continuous WAL
    ending last (`latest`: everything the server flushed by then is archived; `lag_s`:
    how far behind now), the gaps before it, and the bases; `earliest` is the first
    instant a base whose WAL is continuous up to `latest` reaches (null without one:
    nothing is recovered from WAL alone)."""
    listing = list(listing)
    now_archived = current(listing)
    held = now_archived.pieces
    found = runs(held)
    last = found[-1] if found else None
    # a base counts once WAL from its start is archived up to past its consistent point
    usable = [b for b in now_archived.bases if last is not None and b.timeline == last.timeline
              and last.start <= b.start and b.end <= last.end
              and last.covers_until is not None and b.consistent_at <= last.covers_until]
    seg_bytes = held[0].seg_bytes if held else 16 << 20
    damaged = [(str(d.get("filename")), r) for d in listing if d.get("damaged")
               and (r := named_range(str(d.get("filename")), seg_bytes)) is not None]

    def why(a: Run, b: Run) -> str:
        if a.timeline != b.timeline:
            return f"new timeline {b.timeline}"
        inside = [f for f, (tl, lo, hi) in damaged
                  if tl == a.timeline and lo < b.start and hi > a.end]
        return f"WAL damaged in storage: {', '.join(inside[:3])}" if inside \
            else "WAL missing from the archive"
    gaps: list[dict[str, object]] = [
        {"timeline": b.timeline, "from_lsn": lsn_text(a.end),
         "to_lsn": lsn_text(b.start) if a.timeline == b.timeline else None,
         "after": _iso(a.covers_until), "why": why(a, b)}
        for a, b in zip(found, found[1:], strict=False)]
    gaps = now_archived.replaced + gaps
    latest = last.covers_until if last else None
    return {
        "earliest": _iso(min((b.consistent_at for b in usable), default=None)),
        "latest": _iso(latest),
        "lag_s": None if latest is None else round((now - latest).total_seconds(), 3),
        "timeline": last.timeline if last else None,
        "wal": {"from_lsn": lsn_text(last.start), "to_lsn": lsn_text(last.end)}
        if last else None,
        "bases": [{"filename": b.filename, "timeline": b.timeline,
                   "start_lsn": lsn_text(b.start), "end_lsn": lsn_text(b.end),
                   "consistent_at": _iso(b.consistent_at), "size_bytes": b.size_bytes,
                   "usable": b in usable, "last_drill": b.last_drill}
                  for b in now_archived.bases],
        "gaps": gaps,
    }
