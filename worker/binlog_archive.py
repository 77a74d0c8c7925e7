"""The binlog archive of MySQL/MariaDB targets with `[targets.<t>.pitr] enabled = true`
(issue 26): the PostgreSQL archive's lease, seam and checks (worker/pitr.py), fed by
`mariadb-binlog --read-from-remote-server --raw --stop-never`.

The client writes the server's binlog files into a private spool as it receives them.
Every `ship_interval` the complete events it has written since the last shipment go to
every destination as one archive object (`binlogpart`: the file's number and byte range in
its name; events are cut whole, so a shipment always ends where an event ends, and its
bytes are exactly those of the server's file there). A file whose last event (a rotate, a
stop) is shipped, and that this streamer read from its first byte, is stored whole
(`binlog`) and its parts deleted. A streamer that takes over resumes at the archive's end
(`--start-position`), so nothing is shipped twice and nothing is skipped; a file the server
no longer keeps, or made again (RESET MASTER: another creation stamp), or another server
at the address, is a gap: shown in the window, notified (`pitr.gap`), and a new stretch of
archive starts.

Each shipment's manifest records `covers_until`: the last instant at which everything the
server had written to its binlog is archived (SHOW MASTER STATUS sampled each tick), and
the first and last MariaDB GTID of each domain in it, with where GTIDs changed course
against the archive before it (a domain beginning, a sequence going back: shown and
notified once, the archive goes on).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomysql

from shared import naming, rcmd, scratch
from shared.binlog_window import BinlogPiece, pieces, runs
from shared.binlog_window import base as binlog_base
from shared.errors import PipelineError, SafeholdError
from shared.formats.binlog import (
    FORMAT_DESCRIPTION,
    MAGIC,
    ROTATE,
    STOP,
    Event,
    EventScanner,
    GtidRange,
    Gtids,
    file_parts,
    parse_position,
    position,
    position_text,
)
from worker.engines import my_pitr
from worker.engines.my_connection import connect
from worker.pitr import SpoolRange, Streamer, _iso, _still_wanted, _together
from worker.subproc import Child

log = logging.getLogger("safehold.pitr")
PART_MAX = 64 << 20  # one shipment's bytes at most (more go in the next object)
READ_MAX = 16 << 20  # spool bytes scanned per tick at most (their events' headers are
# held until shipped; the bytes are read back in 1 MiB pieces)


@dataclass
class SpoolFile:
    """One file of the spool as the streamer reads it."""

    number: int
    path: Path
    scanner: EventScanner = field(default_factory=EventScanner)
    created: int | None = None  # its format description's timestamp
    from_start: bool = False  # its real events begin at the server file's start
    fake: bool = False  # the client wrote an event the server made up (log_pos 0)
    gtids: GtidRange = field(default_factory=GtidRange)  # of its shipped events


@dataclass
class Position:
    """The end of the binlog every destination holds."""

    number: int  # the file being archived
    offset: int  # its bytes archived, from 0 (0: none yet)
    complete: bool = False  # its last event is archived: the next file comes
    previous_end: int | None = None  # the file before ended there (a first part says so)
    covers_until: datetime | None = None
    identity: str = ""
    created: dict[int, int] = field(default_factory=dict)  # file -> creation stamp
    gtids: Gtids = field(default_factory=dict)  # the last GTID of each domain archived

    @property
    def at(self) -> int:
        return position(self.number + 1, 0) if self.complete else position(
            self.number, self.offset)


class BinlogStreamer(Streamer):
    """One MySQL/MariaDB target's binlog archive while this worker holds its lease."""

    async def run(self) -> None:
        facts = await my_pitr.preflight(self.target)
        self.bsamples: collections.deque[tuple[datetime, int]] = collections.deque(maxlen=600)
        async with scratch.work_dir("binlog") as spool:
            self.spool = spool
            async with connect(self.target) as conn:
                shipped = await self._resume_binlog(conn, facts)
                start = shipped.number + 1 if shipped.complete else shipped.number
                offset = 0 if shipped.complete else shipped.offset
                # (covers_until with them: a word left by the last streamer about a
                # later end must never be read as this end's)
                await self.state(streamer=self.lease.owner, identity=shipped.identity,
                                 shipped_lsn=position_text(shipped.at),
                                 covers_until=_iso(shipped.covers_until),
                                 started_at=_iso(datetime.now(UTC)))
                log.info("pitr %s: streaming binlog from %s as %s", self.target.id,
                         position_text(position(start, offset)), self.lease.owner)
                async with my_pitr.receiving(self.target, spool, facts.basename, start,
                                             offset) as child:
                    await _together(self._stream(conn, child, spool, facts, shipped),
                                    self._prune_daily())

    # ------------------------------------------------------------------ resume
    async def _resume_binlog(self, conn: aiomysql.Connection,
                             facts: my_pitr.ServerFacts) -> Position:
        """Where the archive ends, checked against the files the server keeps."""
        everything = pieces(await self.catalog.list_backups(self.archive.id))
        prefix = f"{facts.identity}:"
        mine = [p for p in everything if p.identity.startswith(prefix)]
        newest = max(mine, key=lambda p: (p.created_at, p.end), default=None)
        files = await my_pitr.server_files(conn, facts.basename)
        now_at = await my_pitr.server_position(conn)
        state: dict[str, str] = {}  # what this target's streamer last said
        with contextlib.suppress(Exception):
            state = await rcmd.hgetall_text(self.redis, self.keys.pitr(self.target.id, "state"))
        if not files or now_at is None:
            raise PipelineError("the server lists no binlog files", code="pitr_not_ready")
        oldest, current = min(files), now_at >> 32
        if newest is not None:
            identity = newest.identity
            stretch = [p for p in mine if p.identity == identity]
            end = runs(stretch)[-1].end
            shipped = self._position_of(stretch, end, identity)
        elif (said := self._said_end(state, prefix)) is not None:
            # the archive lists nothing of this server though its streamer said it shipped
            # (a destination unreadable now lists as empty): go on from there under the
            # same identity — a lost archive then shows as what it lacks
            identity, end = said
            shipped = self._position_of([], end, identity)
        else:
            if everything:
                await self._binlog_gap(
                    f"another server answers at the target's address (server id and "
                    f"binlog name {facts.identity}; the archive so far is of "
                    f"{everything[-1].identity.rsplit(':', 1)[0]}): a new archive starts at "
                    f"{facts.basename}.{current:06d}", None, position(current, 0))
            return Position(current, 0, identity=f"{prefix}{int(time.time())}")
        number, offset = end >> 32, end & 0xFFFFFFFF
        reset = state.get("reset_of", "") == identity  # said before
        if offset == 0 and newest is not None and number - 1 in files:
            # a complete file archived: the server's file of that number must be it still
            held = max((p.hi for p in mine if p.identity == identity
                        and p.number == number - 1), default=None)
            reset = reset or (held is not None and files[number - 1] != held)
        if not reset and (number in files and offset <= files[number] or (offset == 0 and (
                number in files or number == current + 1))):
            return shipped
        purged = number < oldest and not reset  # the server went on: positions still grow
        why = (f"binlog {facts.basename}.{number:06d} from byte {offset} is gone from the "
               "server (purged before it was archived)" if purged else
               f"binlog {facts.basename}.{number:06d} is not on the server as archived "
               "(the binlog was reset: RESET MASTER)")
        await self._binlog_gap(why + f"; the archive goes on from {facts.basename}."
                               f"{oldest:06d}", end, position(oldest, 0))
        return Position(oldest, 0, identity=identity if purged
                        else f"{prefix}{int(time.time())}",
                        created=shipped.created if purged else {})

    @staticmethod
    def _said_end(state: dict[str, str], prefix: str) -> tuple[str, int] | None:
        """The identity and archive end this target's streamer last said it shipped."""
        identity = state.get("identity", "")
        end = parse_position(state.get("shipped_lsn", ""))
        if identity.startswith(prefix) and end is not None and end > 0:
            return identity, end
        return None

    @staticmethod
    def _position_of(stretch: list[BinlogPiece], end: int, identity: str) -> Position:
        last = [p for p in stretch if p.end == end]
        covers = max((p.covers_until for p in last if p.covers_until), default=None)
        created = {p.number: p.file_created for p in stretch}
        gtids = runs(stretch)[-1].gtid_last if stretch else {}
        number, offset = end >> 32, end & 0xFFFFFFFF
        if offset == 0:  # a complete file: the next one comes
            return Position(number - 1, 0, complete=True, covers_until=covers,
                            identity=identity, created=created, gtids=gtids)
        return Position(number, offset, covers_until=covers, identity=identity,
                        created=created, gtids=gtids)

    async def _binlog_gap(self, why: str, start: int | None, end: int) -> None:
        await self._gap_alert(why, {"from": position_text(start) if start is not None
                                    else None, "to": position_text(end)})

    # ------------------------------------------------------------------ stream
    async def _stream(self, conn: aiomysql.Connection, child: Child, spool: Path,
                      facts: my_pitr.ServerFacts, shipped: Position) -> None:
        files: dict[int, SpoolFile] = {}
        while True:
            tick = time.monotonic()
            await self.lease.refresh()
            ended = child.proc.returncode is not None  # (what it wrote is shipped first)
            sampled = datetime.now(UTC)  # (before: a write after it is never "covered")
            server = await my_pitr.server_position(conn)
            if server is not None:
                self.bsamples.append((sampled, server))
            read = await asyncio.to_thread(self._read_spool, spool, facts, files, shipped)
            await self._same_files(files, shipped)
            for number, events in read:
                await self._ship(files[number], events, facts, shipped)
            if ended:
                raise PipelineError(f"mariadb-binlog ended: {child.error_text()}",
                                    code="pitr_receiver_stopped")
            if server is not None and server <= shipped.at and self.bsamples:
                shipped.covers_until = self.bsamples[-1][0]  # idle: all archived
            held = await self._unarchived(conn, facts, shipped, server)
            await self._lagging(
                held, f"the server holds {held >> 20} MiB of binlog the archive lacks (alarm "
                      f"at {self.pitr.lag_alarm_mb} MiB): if it purges them first "
                      "(expire_logs_days, binlog_expire_logs_seconds) the window gets a gap",
                {"unarchived_bytes": held})
            await self.state(shipped_lsn=position_text(shipped.at),
                             server_lsn=position_text(server) if server else "",
                             covers_until=_iso(shipped.covers_until), slot_bytes=held,
                             updated_at=_iso(datetime.now(UTC)), error="")
            _still_wanted()
            await asyncio.sleep(max(0.05, self.pitr.ship_interval - (time.monotonic() - tick)))

    @staticmethod
    async def _unarchived(conn: aiomysql.Connection, facts: my_pitr.ServerFacts,
                          shipped: Position, server: int | None) -> int:
        """Bytes of binlog the server wrote that the archive does not hold yet."""
        if server is None or server <= shipped.at:
            return 0
        if server >> 32 == shipped.at >> 32:
            return (server - shipped.at) & 0xFFFFFFFF
        sizes = await my_pitr.server_files(conn, facts.basename)
        first, last = shipped.at >> 32, server >> 32
        return (sizes.get(first, 0) - (shipped.at & 0xFFFFFFFF)) + sum(
            sizes.get(n, 0) for n in range(first + 1, last)) + (server & 0xFFFFFFFF)

    def _read_spool(self, spool: Path, facts: my_pitr.ServerFacts,
                    files: dict[int, SpoolFile], shipped: Position
                    ) -> list[tuple[int, list[Event]]]:
        """The complete events the client wrote since the last look, per file, in order
        (never more than READ_MAX a tick: the rest waits for the next one). A file is read
        to its end before the next one is looked at: a later file's events never pass
        ahead of an earlier one's."""
        out = []
        names = sorted((n, p) for p in spool.iterdir()
                       if (parts := file_parts(p.name)) and parts[0] == facts.basename
                       for n in [parts[1]])
        budget = READ_MAX
        for number, path in names:
            if number < shipped.number:
                continue
            sf = files.setdefault(number, SpoolFile(number, path))
            start = sf.scanner.offset
            with open(path, "rb") as f:
                events, more = sf.scanner.scan(f, budget)
            budget -= sf.scanner.offset - start
            real = []
            for ev in events:
                if ev.type == FORMAT_DESCRIPTION and sf.created is None:
                    sf.created = ev.timestamp
                    sf.from_start = ev.log_pos != 0
                if ev.log_pos == 0:
                    sf.fake = True
                    continue  # made up for this connection: not in the server's file
                real.append(ev)
            if real:
                out.append((number, real))
            if more:
                break  # this file first (an event the client writes still, or past budget)
        return out

    async def _same_files(self, files: dict[int, SpoolFile], shipped: Position) -> None:
        """Each file the client writes is the one the archive holds part of (its creation
        stamp, from its format description — the one the server makes up for a resumed
        connection says it too): a file made again (RESET MASTER) stops the stream, and
        the next start begins a new stretch."""
        for number, sf in files.items():
            known = shipped.created.get(number)
            if sf.created is not None and known is not None and known != sf.created:
                await self.state(reset_of=shipped.identity)
                raise PipelineError(f"binlog file {number} was made again on the server (its "
                                    "creation stamp changed): the binlog was reset",
                                    code="pitr_binlog_reset")

    async def _ship(self, sf: SpoolFile, events: list[Event], facts: my_pitr.ServerFacts,
                    shipped: Position) -> None:
        """Events of one file, in as many parts as PART_MAX needs; each checked to follow
        the archive's end exactly."""
        number = sf.number
        if number != shipped.number:  # the server moved on to the next file
            if number != shipped.number + 1:
                raise PipelineError(f"binlog file {number} follows {shipped.number}",
                                    code="pitr_binlog_order")
            previous = None if shipped.complete else shipped.offset
            shipped.number, shipped.offset, shipped.complete = number, 0, False
            shipped.previous_end = previous
        if sf.created is None:
            raise PipelineError(f"binlog file {number}: no format description first",
                                code="corrupt_binlog")
        shipped.created[number] = sf.created
        batch: list[Event] = []
        size = 0
        for ev in events:  # (a part is one stretch of the spool file: a made-up event cuts)
            if batch and (size + ev.size > PART_MAX or ev.at != batch[-1].at + batch[-1].size):
                await self._ship_part(number, batch, sf, facts, shipped)
                batch, size = [], 0
            batch.append(ev)
            size += ev.size
        if batch:
            await self._ship_part(number, batch, sf, facts, shipped)
        if shipped.complete:
            await self._compact_file(number, sf, facts, shipped)

    async def _ship_part(self, number: int, batch: list[Event], sf: SpoolFile,
                         facts: my_pitr.ServerFacts, shipped: Position) -> None:
        lo, head = batch[0].start, b""
        if shipped.offset == 0 and lo == 4:  # the file's first part holds its magic too
            lo, head = 0, MAGIC
        if lo != shipped.offset:
            raise PipelineError(f"binlog file {number}: events from byte {lo}, archived up "
                                f"to {shipped.offset}", code="pitr_binlog_order")
        if any(b.start != a.log_pos for a, b in zip(batch, batch[1:], strict=False)):
            raise PipelineError(f"binlog file {number}: events do not follow each other",
                                code="corrupt_binlog")
        async with SpoolRange(sf.path, batch[0].at, batch[-1].at + batch[-1].size,
                              head) as region:
            await self._ship_region(number, lo, region, batch, sf, facts, shipped)

    async def _ship_region(self, number: int, lo: int, region: SpoolRange,
                           batch: list[Event], sf: SpoolFile, facts: my_pitr.ServerFacts,
                           shipped: Position) -> None:
        hi = lo + region.size
        if hi != batch[-1].log_pos:
            raise PipelineError(f"binlog file {number}: events do not follow each other",
                                code="corrupt_binlog")
        complete = batch[-1].type in (ROTATE, STOP)
        end = position(number + 1, 0) if complete else position(number, hi)
        covers = self._binlog_covered(end)
        seen = GtidRange(shipped.gtids)
        seen.add(batch)
        changes = [{"at": position_text(position(number, at)), "why": why}
                   for at, why in seen.changes]
        facts_doc: dict[str, object] = {
            "plain_sha256": region.sha256, "number": number,
            "start": lo, "end": hi, "complete": complete, "identity": shipped.identity,
            "file_created": sf.created, "file": my_pitr.file_name(facts.basename, number),
            "server_id": facts.server_id, "server_version": facts.version,
            "first_event_at": _iso(datetime.fromtimestamp(batch[0].timestamp, UTC)),
            "last_event_at": _iso(datetime.fromtimestamp(batch[-1].timestamp, UTC)),
            "covers_until": _iso(covers) if covers else None, "fence": self.lease.fence,
            **seen.facts(), **({"gtid_changes": changes} if changes else {})}
        if lo == 0 and shipped.previous_end is not None:
            facts_doc["previous_end"] = shipped.previous_end
        for change in changes:  # a course change, not a hole: said (before the shipment
            # that holds it: a streamer dying between the two leaves its successor to
            # find it again, and say nothing more), the archive goes on
            await self._gap_alert(f"binlog {facts.basename}.{number:06d} at byte "
                                  f"{change['at'].split(':')[1]}: {change['why']}",
                                  {"from": change["at"], "to": change["at"],
                                   "continuous": True})
        await self._put("binlogpart", f"{number:08X}_{lo:08X}-{hi:08X}", region.chunks(),
                        facts_doc)
        shipped.offset, shipped.complete = hi, complete
        if covers is not None:
            shipped.covers_until = covers
        shipped.gtids = seen.known
        sf.gtids.merge(seen)  # (the whole file's object says them all again)

    def _binlog_covered(self, end: int) -> datetime | None:
        found = None
        for at, server in self.bsamples:
            if server <= end:
                found = at
        return found

    async def _compact_file(self, number: int, sf: SpoolFile, facts: my_pitr.ServerFacts,
                            shipped: Position) -> None:
        """A complete file this streamer read from its first byte: stored whole, its parts
        deleted; the spool's copy goes either way."""
        path = self.spool / my_pitr.file_name(facts.basename, number)
        if sf.from_start and not sf.fake and path.exists():
            archived = [p for p in pieces(await self.catalog.list_backups(self.archive.id))
                        if p.kind == "binlogpart" and p.number == number
                        and p.identity == shipped.identity]
            async with SpoolRange(path) as whole:
                if whole.size == shipped.offset:
                    await self._compact_put(number, whole, sf, facts, shipped)
                    for piece in archived:
                        with contextlib.suppress(SafeholdError):
                            await self.catalog.delete(self.archive.id,
                                                      naming.parse_stored(piece.filename))
        with contextlib.suppress(OSError):
            await asyncio.to_thread(path.unlink)

    async def _compact_put(self, number: int, whole: SpoolRange, sf: SpoolFile,
                           facts: my_pitr.ServerFacts, shipped: Position) -> None:
        await self._put("binlog", f"{number:08X}", whole.chunks(), {
            "plain_sha256": whole.sha256, "number": number,
            "start": 0, "end": whole.size, "complete": True,
            "identity": shipped.identity, "file_created": sf.created,
            "file": my_pitr.file_name(facts.basename, number),
            "server_id": facts.server_id, "server_version": facts.version,
            "covers_until": _iso(shipped.covers_until), **sf.gtids.facts(),
            **({"gtid_changes": [
                {"at": position_text(position(number, at)), "why": why}
                for at, why in sf.gtids.changes]} if sf.gtids.changes else {}),
            **({"previous_end": shipped.previous_end}
               if shipped.previous_end is not None else {}),
            "fence": self.lease.fence})

    # ------------------------------------------------------------------ prune
    async def _prune_daily(self) -> None:
        while True:
            await self.prune_binlog(datetime.now(UTC))
            _still_wanted()
            await asyncio.sleep(600)

    async def prune_binlog(self, now: datetime) -> list[str]:
        """Keep the window `keep_days` long: binlog files before the newest base older
        than that go (the window starts there; its own file is kept whole, the decoder
        reads it from its start); with no such base, binlog older than that; a replaced
        server's archive by age alone."""
        listing = await self.catalog.list_backups(self.archive.id)
        held = pieces(listing)
        newest = max(held, key=lambda p: (p.created_at, p.end), default=None)
        if newest is None:
            return []
        cutoff = now - timedelta(days=self.pitr.keep_days)
        backups = await self.catalog.list_backups(self.target.id)
        stretch = runs([p for p in held if p.identity == newest.identity])
        since = min(r.since for r in stretch)  # a base before it is of the old binlog
        old = [b for doc in backups if (b := binlog_base(doc)) is not None
               and b.identity == newest.identity.rsplit(":", 1)[0]
               and since <= b.consistent_at < cutoff]
        start = max((b.position for b in old), default=None)
        doomed = [p.filename for p in held
                  if (p.identity == newest.identity and (
                      p.end <= position(start >> 32, 0) if start is not None else
                      p.covers_until is not None and p.covers_until < cutoff))
                  or (p.identity != newest.identity and p.created_at < cutoff)]
        for filename in doomed:
            with contextlib.suppress(SafeholdError):
                await self.catalog.delete(self.archive.id, naming.parse_stored(filename))
        if doomed:
            log.info("pitr %s: pruned %d binlog object(s) older than %.1f days",
                     self.target.id, len(doomed), self.pitr.keep_days)
        return doomed
