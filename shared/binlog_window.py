"""A MySQL/MariaDB target's recovery window (issue 26), read from its binlog archive
(`<target>.pitr`) and its regular backups (the bases: each records the binlog position of
its snapshot).

A position is (file number << 32 | byte offset) (shared.formats.binlog). An archive object
holds bytes [lo, hi) of one binlog file, as its name says; a manifest that disagrees with
its own name proves nothing. A piece that ends its file (its last event a rotate or a
stop, `complete`) reaches the next file's start; a file's first piece that says where the
one before it ended (`previous_end`: the server moved on from there while one streamer
watched) joins it. Anything else between two pieces is a gap — shown, never bridged.
Pieces of another server (its id and files' name: `identity`), or of a file made again
under the same number (RESET MASTER: another creation stamp), start a new archive.

Each piece also says the first and last MariaDB GTID of each domain in it, and where the
GTIDs changed course (a domain began after others, a domain's sequence went back: the
server's gtid_domain_id or gtid_seq_no was changed, or it writes another primary's
transactions now). Those are shown with the gaps (`continuous`: the binlog itself goes on
there, and so does recovery by position or time; GTIDs on either side are of different
streams).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from shared import naming
from shared.errors import InvalidBackupName
from shared.formats.binlog import (
    Gtids,
    gtid_text,
    parse_gtids,
    parse_position,
    position,
    position_text,
)
from shared.pitr_window import _drill, _iso, _when

KINDS = ("binlog", "binlogpart")


@dataclass(frozen=True)
class BinlogPiece:
    filename: str
    kind: str
    number: int  # the binlog file's number
    start: int  # position
    end: int  # position; a complete file's: the next file's start
    joins: int | None  # a first piece: where the file before it ended
    covers_until: datetime | None  # all the server had written by then is archived
    created_at: datetime
    identity: str
    file_created: int  # the file's format description event's timestamp
    lo: int = 0  # its bytes of the file: [lo, hi)
    hi: int = 0
    gtid_first: Gtids = field(default_factory=dict)  # its first and last GTID per domain
    gtid_last: Gtids = field(default_factory=dict)
    gtid_changes: tuple[tuple[int, str], ...] = ()  # (position, what): a domain began…


def piece(doc: Mapping[str, object]) -> BinlogPiece | None:
    if doc.get("damaged") or doc.get("kind") not in KINDS:
        return None
    try:
        name = naming.parse_archive(str(doc.get("filename")))
        number = int(name.ref[:8], 16)
        raw = doc.get("raw_bytes")
        if not isinstance(raw, int) or raw <= 0:
            return None
        lo, hi = (0, raw) if name.kind == "binlog" else (
            int(name.ref[9:17], 16), int(name.ref[18:26], 16))
    except (ValueError, IndexError, InvalidBackupName):
        return None
    complete = doc.get("complete") is True or name.kind == "binlog"
    identity, created = doc.get("identity"), doc.get("file_created")
    if doc.get("number") != number or (doc.get("start"), doc.get("end")) != (lo, hi) or \
            not lo < hi or hi - lo != raw or not isinstance(identity, str) or \
            not isinstance(created, int) or isinstance(created, bool):
        return None
    previous = doc.get("previous_end")
    joins = position(number - 1, previous) if lo == 0 and number > 0 and isinstance(
        previous, int) and not isinstance(previous, bool) and previous > 0 else None
    return BinlogPiece(name.filename, name.kind, number, position(number, lo),
                       position(number + 1, 0) if complete else position(number, hi), joins,
                       _when(doc.get("covers_until")), name.created_at, identity, created,
                       lo, hi, parse_gtids(doc.get("gtid_first")) or {},
                       parse_gtids(doc.get("gtid_last")) or {},
                       _changes(doc.get("gtid_changes"), number, lo, hi))


def _changes(listed: object, number: int, lo: int, hi: int) -> tuple[tuple[int, str], ...]:
    """A piece's GTID changes as its manifest says them: inside its own bytes, a short
    plain text each, a few at most (a manifest is read back from storage: shown, never
    obeyed)."""
    out = []
    for item in listed[:20] if isinstance(listed, list) else []:
        at = parse_position(str(item.get("at"))) if isinstance(item, Mapping) else None
        why = item.get("why") if isinstance(item, Mapping) else None
        if at is not None and at >> 32 == number and lo <= at & 0xFFFFFFFF < hi and \
                isinstance(why, str) and why.isprintable() and len(why) <= 300:
            out.append((at, why))
    return tuple(out)


def pieces(listing: Iterable[Mapping[str, object]]) -> list[BinlogPiece]:
    found = [p for doc in listing if (p := piece(doc)) is not None]
    return sorted(found, key=lambda p: (p.start, -p.end))


@dataclass(frozen=True)
class Run:
    """Continuous binlog of one server."""

    identity: str
    start: int
    end: int
    covers_until: datetime | None
    files: dict[int, int]  # file number -> its creation stamp
    gtid_first: Gtids = field(default_factory=dict)
    gtid_last: Gtids = field(default_factory=dict)
    gtid_changes: tuple[tuple[int, str], ...] = ()

    @property
    def since(self) -> datetime:
        """When the server made its first file: a base taken before that is of another
        binlog (positions start again after a reset)."""
        return datetime.fromtimestamp(self.files[min(self.files)], UTC)

    @property
    def server(self) -> str:
        """The server's id and files' name (its identity without the archive's epoch)."""
        return self.identity.rsplit(":", 1)[0]


def runs(found: list[BinlogPiece]) -> list[Run]:
    out: list[Run] = []
    for p in found:
        last = out[-1] if out else None
        same_file = last is not None and last.files.get(p.number, p.file_created) == \
            p.file_created
        if last is not None and last.identity == p.identity and same_file and (
                p.start <= last.end or p.joins == last.end):
            covers = max((t for t in (last.covers_until, p.covers_until) if t), default=None)
            later = p.end > last.end
            changes = last.gtid_changes + tuple(c for c in p.gtid_changes
                                                if c not in last.gtid_changes)
            out[-1] = Run(last.identity, last.start, max(last.end, p.end), covers,
                          {**last.files, p.number: p.file_created},
                          {**p.gtid_first, **last.gtid_first},
                          {**last.gtid_last, **p.gtid_last} if later else
                          {**p.gtid_last, **last.gtid_last}, changes)
            continue
        out.append(Run(p.identity, p.start, p.end, p.covers_until,
                       {p.number: p.file_created}, dict(p.gtid_first), dict(p.gtid_last),
                       p.gtid_changes))
    return out


@dataclass(frozen=True)
class BinlogBase:
    """A regular backup that records where in the binlog its snapshot stands."""

    filename: str
    position: int
    gtid: str | None
    consistent_at: datetime
    size_bytes: int
    identity: str  # the server's id and binlog files' name
    last_drill: dict[str, object] | None = None  # the last PITR drill that started here


def base(doc: Mapping[str, object]) -> BinlogBase | None:
    facts = doc.get("binlog")
    if doc.get("damaged") or not isinstance(facts, Mapping) or doc.get("only_tables"):
        return None
    number, offset = facts.get("number"), facts.get("position")
    at, size = _when(facts.get("consistent_at")), doc.get("size_bytes")
    identity, gtid = facts.get("identity"), facts.get("gtid")
    if not isinstance(number, int) or not isinstance(offset, int) or at is None or \
            not isinstance(size, int) or not isinstance(identity, str) or \
            isinstance(number, bool) or isinstance(offset, bool) or \
            not 0 < number < 1 << 31 or not 0 < offset < 1 << 32:
        return None
    return BinlogBase(str(doc.get("filename")), position(number, offset),
                      gtid if isinstance(gtid, str) else None, at, size, identity,
                      _drill(doc.get("last_drill")))


@dataclass(frozen=True)
class Said:
    """What the target's streamer last said (its Redis state): the archive's end it had
    shipped, and the last instant by which the server had written nothing past it. An
    idle server writes no binlog, so no shipment carries that instant: without this the
    window would end at the last write however long ago it was."""

    identity: str
    end: int
    covers_until: datetime


def said_of(state: Mapping[str, str]) -> Said | None:
    end = parse_position(state.get("shipped_lsn", ""))
    at = _when(state.get("covers_until") or None)
    identity = state.get("identity", "")
    if end is None or at is None or not identity or at > datetime.now(UTC):
        return None  # (an instant not come yet is no one's word)
    return Said(identity, end, at)


def _extended(found: list[Run], said: Said | None) -> list[Run]:
    """The last run reaches the streamer's last instant when it ends where the streamer
    said it had shipped (the same stretch, nothing shipped since)."""
    last = found[-1] if found else None
    if last is not None and said is not None and last.identity == said.identity and \
            last.end == said.end and (last.covers_until is None
                                      or said.covers_until > last.covers_until):
        return [*found[:-1], replace(last, covers_until=said.covers_until)]
    return found


def window(archive: Iterable[Mapping[str, object]], backups: Iterable[Mapping[str, object]],
           now: datetime, said: Said | None = None) -> dict[str, object]:
    """`GET …/recovery-window` for a MySQL/MariaDB target: the continuous binlog ending
    last, the gaps before it, the bases (with `usable`: its position inside that binlog,
    its snapshot before its end); `earliest` is the first instant a usable base reaches."""
    held = pieces(archive)
    newest = max(held, key=lambda p: (p.created_at, p.end), default=None)
    mine = [p for p in held if newest is not None and p.identity == newest.identity]
    found = _extended(runs(mine), said)
    last = found[-1] if found else None
    found_bases = sorted((found_base for doc in backups
                          if (found_base := base(doc)) is not None), key=lambda b: b.position)
    # (the decoder reads a base's file from its start: the run must hold all of it)
    usable = [b for b in found_bases if last is not None and b.identity == last.server
              and last.start <= position(b.position >> 32, 0) and b.position <= last.end
              and last.covers_until is not None
              and last.since <= b.consistent_at <= last.covers_until]
    gaps: list[dict[str, object]] = []
    others = sorted({p.identity for p in held if newest and p.identity != newest.identity})
    for other in others:
        ended = max((p.covers_until for p in held if p.identity == other and p.covers_until),
                    default=None)
        same = newest is not None and other.rsplit(":", 1)[0] == newest.identity.rsplit(
            ":", 1)[0]
        gaps.append({"from": None, "to": None, "after": _iso(ended), "continuous": False,
                     "why": "the binlog was reset on the server (RESET MASTER): a new "
                            "stretch of archive starts" if same else
                            f"the server was replaced (now {newest.identity if newest else '?'}"
                            f"; the archive before it is of {other})"})
    for before, after in zip(found, found[1:], strict=False):
        reset = any(after.files.get(n, c) != c for n, c in before.files.items())
        gaps.append({"from": position_text(before.end), "to": position_text(after.start),
                     "after": _iso(before.covers_until), "continuous": False,
                     "why": "the binlog was reset on the server (RESET MASTER): its files "
                            "were made again" if reset else
                            "binlog missing from the archive (purged on the server before "
                            "it was archived, or lost in storage)"})
    for at, why in last.gtid_changes if last else ():  # the binlog goes on: not a hole
        gaps.append({"from": position_text(at), "to": position_text(at), "after": None,
                     "why": why, "continuous": True})
    latest = last.covers_until if last else None
    return {
        "engine": "mysql",
        "earliest": _iso(min((b.consistent_at for b in usable), default=None)),
        "latest": _iso(latest),
        "lag_s": None if latest is None else round((now - latest).total_seconds(), 3),
        "binlog": {"from": position_text(last.start), "to": position_text(last.end)}
        if last else None,
        "basename": last.identity.split(":")[1] if last else None,
        "gtid": {"from": gtid_text(last.gtid_first), "to": gtid_text(last.gtid_last)}
        if last and last.gtid_first else None,
        "bases": [{"filename": b.filename, "position": position_text(b.position),
                   "gtid": b.gtid, "consistent_at": _iso(b.consistent_at),
                   "size_bytes": b.size_bytes, "usable": b in usable,
                   "last_drill": b.last_drill}
                  for b in found_bases],
        "gaps": gaps,
    }


@dataclass(frozen=True)
class BinlogRecovery:
    """What recovering to an instant takes: the newest base consistent by then and the
    archived binlog from its file's start on (one stretch, continuous)."""

    base: BinlogBase
    pieces: list[BinlogPiece]
    at: datetime | None  # None: the archive's end ("latest"), or a stop position
    basename: str
    stop: int | None = None  # a binlog position: replayed up to the event there
    gtid: tuple[int, int, int] | None = None  # replayed through that transaction


def choose(archive: Iterable[Mapping[str, object]], backups: Iterable[Mapping[str, object]],
           at: datetime | None, target: str, *, random_point: bool = False,
           stop: int | None = None, gtid: tuple[int, int, int] | None = None,
           said: Said | None = None) -> BinlogRecovery:
    """The recovery of `at` (None: the archive's end; `random_point`: anywhere in the
    window; `stop`: up to that binlog position instead; `gtid`: (domain, server, seq),
    through that transaction: the newest base without it, and the pieces up to one that
    shows a later transaction of its domain — where it is exactly, the staged bytes say);
    RestoreFailed outside_window (nothing changed) when the window lacks it."""
    import random

    from shared.errors import RestoreFailed

    held = pieces(archive)
    newest = max(held, key=lambda p: (p.created_at, p.end), default=None)
    mine = [p for p in held if newest is not None and p.identity == newest.identity]
    found = _extended(runs(mine), said)
    last = found[-1] if found else None
    if last is None or last.covers_until is None:
        raise RestoreFailed(f"target '{target}' has no archived binlog yet",
                            database_unchanged=True, code="outside_window")
    covered = [b for doc in backups if (b := base(doc)) is not None
               and b.identity == last.server and last.start <= position(b.position >> 32, 0)
               and b.position <= last.end
               and last.since <= b.consistent_at <= last.covers_until]
    if random_point and covered:
        first = min(b.consistent_at for b in covered)
        at = first + (last.covers_until - first) * random.random()
    until = at if at is not None else last.covers_until
    usable = [b for b in covered if b.consistent_at <= until and (
        stop is None or b.position <= stop) and (gtid is None or before_gtid(b, gtid))]
    if not usable or until > last.covers_until or stop is not None and not (
            last.start <= stop <= last.end) or gtid is not None and not in_run(last, gtid):
        earliest = min((b.consistent_at for b in covered), default=None)
        raise RestoreFailed(
            f"{_iso(at) or 'latest'} is outside the recovery window of '{target}' (from "
            f"{_iso(earliest) or 'no base yet'} to {_iso(last.covers_until)}); nothing was "
            "changed", database_unchanged=True, code="outside_window")
    chosen = max(usable, key=lambda b: (b.consistent_at, b.position))
    first_file = position(chosen.position >> 32, 0)
    upto = last.end if stop is None else stop
    if gtid is not None:  # up to a piece where a later transaction of its domain began
        upto = min((p.end for p in mine if p.end > first_file
                    and p.gtid_last.get(gtid[0], (0, -1))[1] > gtid[2]), default=upto)
    needed = [p for p in mine if p.end > first_file and p.start < upto]
    return BinlogRecovery(chosen, needed, at, chosen.identity.split(":", 1)[1], stop, gtid)


def before_gtid(b: BinlogBase, gtid: tuple[int, int, int]) -> bool:
    """The base's snapshot does not hold that transaction yet (its GTID position, read
    with its binlog position, is before it in the domain)."""
    held = parse_gtids(b.gtid)
    return held is not None and held.get(gtid[0], (0, -1))[1] < gtid[2]


def in_run(run: Run, gtid: tuple[int, int, int]) -> bool:
    """The run's GTIDs of that domain reach that transaction."""
    last = run.gtid_last.get(gtid[0])
    return last is not None and gtid[2] <= last[1]
