"""The WAL archive of PostgreSQL targets with `[targets.<t>.pitr] enabled = true`.

Every worker runs `PitrService`; for each such target exactly one of them holds its
*lease* (a Redis key, refreshed every second, with a fencing number from a counter that
only grows) and streams: `pg_receivewal` writes WAL into a private spool, and every
`ship_interval` the bytes the receiver has flushed since the last shipment go to every
destination of the target as one archive object (`walpart`: the segment's name and byte
range in its name) through the codec chain, sha256, read-back and a manifest — the same
seam as a backup. A segment complete in the spool is shipped whole (`wal`) and its parts
are deleted. Only when every destination holds a shipment does the slot advance to its
end: WAL nobody archived yet stays on the server (see worker/engines/pg_pitr.py).

Each shipment's manifest records `covers_until`: the last instant at which everything the
server had flushed is archived (samples of pg_current_wal_flush_lsn() taken each tick).
The recovery window is read from the archive itself (shared/pitr_window.py); Redis holds
only what the streamer is doing now (`Keys.pitr`), for the lag and the page.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import asyncpg
import pymysql
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import codecs, manifests, naming, rcmd, schedules, scratch
from shared.audit import AuditLog
from shared.config import Settings, TargetConfig
from shared.errors import PipelineError, SafeholdError
from shared.keys import Keys
from shared.notify import Notifier
from shared.pitr_window import ArchivedPiece, bases, current, pieces, runs
from shared.storage.catalog import Catalog
from worker import pipeline
from worker.engines import pg_pitr
from worker.engines.pg_connection import connect
from worker.subproc import Child

log = logging.getLogger("safehold.pitr")
LEASE_S = 4.0  # kept alive every second by its holder; a dead holder's lapses this fast
WAIT_S = 0.5  # how often a worker without the lease looks whether it is free
# refresh a lease only while it is ours (a lapsed one is never taken back silently: another
# streamer may have shipped meanwhile)
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def archive_of(target: TargetConfig) -> TargetConfig:
    """The target as its archive's namespace on the same destinations (`<id>.pitr`)."""
    return dataclasses.replace(target, id=target.id + naming.PITR_SUFFIX)


class LeaseLost(Exception):
    """Another worker streams this target now (or Redis lost the lease)."""


class Lease:
    def __init__(self, redis: Redis, keys: Keys, target: str, worker_id: str) -> None:
        self.redis, self.key = redis, keys.pitr(target, "lease")
        self.fence_key = keys.pitr(target, "fence")
        self.worker_id = worker_id
        self.owner = ""
        self.fence = 0

    async def try_acquire(self) -> bool:
        if await self.redis.exists(self.key):
            return False
        fence = int(await self.redis.incr(self.fence_key))
        owner = f"{self.worker_id}#{fence}"
        if not await self.redis.set(self.key, owner, nx=True, px=int(LEASE_S * 1000)):
            return False
        self.owner, self.fence = owner, fence
        return True

    async def refresh(self) -> None:
        if not await rcmd.eval_script(self.redis, _REFRESH, 1, self.key, self.owner,
                                      str(int(LEASE_S * 1000))):
            raise LeaseLost(f"the lease on {self.key} is not ours any more")

    async def release(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await rcmd.eval_script(self.redis, _RELEASE, 1, self.key, self.owner)

    async def keep(self) -> None:
        """Refresh the lease every second while its holder works (a base backup or a
        slow upload never lets it lapse); LeaseLost when it is gone, a Redis error only
        once the lease would have lapsed anyway."""
        ok = time.monotonic()
        while True:
            await asyncio.sleep(LEASE_S / 4)
            try:
                await self.refresh()
                ok = time.monotonic()
            except (RedisError, OSError):
                if time.monotonic() - ok > LEASE_S:
                    raise


@dataclasses.dataclass
class Shipped:
    """The end of the contiguous WAL every destination holds, on one timeline."""

    timeline: int
    lsn: int
    covers_until: datetime | None = None


class Streamer:
    """One target's archive while this worker holds its lease."""

    def __init__(self, settings: Settings, target: TargetConfig, redis: Redis, keys: Keys,
                 catalog: Catalog, notifier: Notifier, lease: Lease,
                 alarms: set[str] | None = None) -> None:
        assert target.pitr is not None
        self.settings, self.target, self.pitr = settings, target, target.pitr
        self.redis, self.keys, self.catalog = redis, keys, catalog
        self.notifier, self.lease = notifier, lease
        self.archive = archive_of(target)
        self.app = f"safehold_pitr_{secrets.token_hex(4)}"
        self.samples: collections.deque[tuple[datetime, int]] = collections.deque(maxlen=600)
        self.chain = self._chain()
        self.alarms = alarms if alarms is not None else set()  # targets lagging now
        self.audit = AuditLog(redis, keys)

    async def _alert(self, event: str, message: str, data: dict[str, object]) -> None:
        """A streamer event (pitr.gap, pitr.lagging): notified and audited, best effort
        (the archive goes on when a receiver or Redis fails)."""
        with contextlib.suppress(Exception):
            await self.notifier.event(event, self.target.id, message, data)
        with contextlib.suppress(Exception):
            await self.audit.record(action=event, result="alert", subject="pitr-streamer",
                                    client=self.lease.owner, target=self.target.id,
                                    detail=message[:500])

    def _chain(self) -> list[codecs.Step]:
        chain: list[codecs.Step] = [{"codec": "zstd", "level": 3, "threads": 0}]
        if self.target.encryption is not None:
            keys = self.target.encryption.recipient_lines()
            chain.append({"codec": "age",
                          "recipients": [codecs.recipient_fingerprint(k) for k in keys],
                          "recipient_keys": keys})
        return chain

    async def state(self, **fields: object) -> None:
        with contextlib.suppress(RedisError, OSError):
            await rcmd.hset(self.redis, self.keys.pitr(self.target.id, "state"), mapping=
                                 {k: "" if v is None else str(v) for k, v in fields.items()})

    # ------------------------------------------------------------------ run
    async def run(self) -> None:
        facts = await pg_pitr.preflight(self.target)
        tools = await pg_pitr.bindir(self.target)
        async with scratch.work_dir("wal") as spool:
            async with connect(self.target) as conn:
                created, restart = await pg_pitr.ensure_slot(conn, self.pitr.slot)
                shipped = await self._resume(facts, created, restart)
                seg = pg_pitr.segment_name(shipped.timeline, shipped.lsn, facts.seg_bytes)
                # a zero-filled `<segment>.partial`: pg_receivewal starts streaming there
                await asyncio.to_thread(pg_pitr.zero_file, spool / f"{seg}.partial",
                                        facts.seg_bytes)
                await self.state(streamer=self.lease.owner, system_id=facts.system_id,
                                 timeline=shipped.timeline,
                                 shipped_lsn=pg_pitr.lsn_text(shipped.lsn),
                                 started_at=_iso(datetime.now(UTC)))
                log.info("pitr %s: streaming from %s (timeline %d) as %s", self.target.id,
                         pg_pitr.lsn_text(shipped.lsn), shipped.timeline, self.lease.owner)
                async with pg_pitr.receiving(self.target, tools, spool, self.app) as child:
                    await _together(self._loop(conn, child, spool, facts, shipped),
                                    self._bases(tools, facts))

    async def _resume(self, facts: pg_pitr.ServerFacts, created: bool,
                      restart: int | None) -> Shipped:
        """Where the archive ends (from the archive itself), checked against the slot: a
        slot that was dropped, or moved past what was archived, is a gap."""
        everything = pieces(await self.catalog.list_backups(self.archive.id))
        archived = [p for p in everything if p.system_id == facts.system_id]
        last = max((p for p in archived if p.timeline == facts.timeline),
                   key=lambda p: p.end, default=None)
        here = restart if restart is not None else 0
        if not archived and everything:
            # another cluster at the target's address (a new server, initdb'd again): its
            # WAL has nothing to do with the archive's; a new archive starts beside it
            await self._gap(f"the server was replaced: system identifier {facts.system_id}, "
                            f"the archive so far is of {everything[-1].system_id}; WAL is "
                            f"archived from {pg_pitr.lsn_text(here)} and a new base backup "
                            "is taken", 0, here)
            return Shipped(facts.timeline, here)
        before = max(archived, key=lambda p: (p.timeline, p.end), default=None)
        if last is None and before is not None:
            # promoted, or restored (restore-cluster, a PITR elsewhere): the archive of the
            # old timeline cannot be continued; the window starts again at a new base
            await self._gap(f"the server is on a new timeline {facts.timeline} (promoted, or "
                            f"restored from a backup); the archive of timeline "
                            f"{before.timeline} ends at {pg_pitr.lsn_text(before.end)}: WAL "
                            f"is archived on timeline {facts.timeline} from "
                            f"{pg_pitr.lsn_text(here)} and a new base backup is taken",
                            before.end, here)
        if last is None:
            return Shipped(facts.timeline, here)
        if here > last.end:  # the server no longer keeps what follows the archive
            await self._gap(f"the replication slot {self.pitr.slot} was "
                            + ("missing (dropped?)" if created else "moved past the archive")
                            + f": WAL {pg_pitr.lsn_text(last.end)}..{pg_pitr.lsn_text(here)} "
                            "is not archived", last.end, here)
            return Shipped(facts.timeline, here)
        if created:
            log.warning("pitr %s: replication slot %s was missing and is created again; "
                        "the server still had the WAL after the archive's end (no gap)",
                        self.target.id, self.pitr.slot)
        return Shipped(facts.timeline, last.end, last.covers_until)

    async def _gap(self, why: str, start: int, end: int) -> None:
        await self._gap_alert(why, {"from_lsn": pg_pitr.lsn_text(start),
                                    "to_lsn": pg_pitr.lsn_text(end)})

    async def _gap_alert(self, why: str, data: dict[str, object]) -> None:
        """pitr.gap, said once: a streamer restarting before it shipped anything finds
        the same gap again and says nothing more. Every gap said is kept (a set: gaps
        are rare, and each one's words name where it is), so a course change said
        before the shipment that holds it, by a streamer that then died, is not said
        twice by its successor, nor lost if it were said after."""
        log.warning("pitr %s: gap: %s", self.target.id, why)
        with contextlib.suppress(RedisError, OSError):
            if not await rcmd.sadd(self.redis, self.keys.pitr(self.target.id, "gaps_said"),
                                   why):
                return
        await self.state(last_gap=why, last_gap_at=_iso(datetime.now(UTC)))
        await self._alert("pitr.gap", f"point-in-time archive of {self.target.id}: {why}",
                          data)

    async def _loop(self, conn: asyncpg.Connection, child: Child, spool: Path,
                    facts: pg_pitr.ServerFacts, shipped: Shipped) -> None:
        while True:
            tick = time.monotonic()
            await self.lease.refresh()
            if child.proc.returncode is not None:
                raise PipelineError(f"pg_receivewal ended: {child.error_text()}",
                                    code="pitr_receiver_stopped")
            pos = await pg_pitr.position(conn, self.app, self.pitr.slot)
            self.samples.append((datetime.now(UTC), pos.server_flush))
            if pos.timeline != shipped.timeline:
                raise PipelineError(f"the server is on timeline {pos.timeline} now "
                                    f"(archived: {shipped.timeline})", code="pitr_timeline")
            # said before shipping: the alarm matters most when the archive is down
            await self._lag_alarm(pos)
            healthy = False  # shipped, or nothing to ship: whatever stopped it is over
            if pos.received is not None and pos.received > shipped.lsn:
                await self._ship_upto(spool, facts, shipped, pos.received)
                await pg_pitr.advance_slot(conn, self.pitr.slot, shipped.lsn)
                healthy = True
            elif pos.received is not None and pos.server_flush <= shipped.lsn:
                shipped.covers_until = self.samples[-1][0]  # idle: all archived
                healthy = True
            await self._compact_done(spool, facts, shipped)
            await self._report(pos, shipped, healthy)
            _still_wanted()
            await asyncio.sleep(max(0.05, self.pitr.ship_interval - (time.monotonic() - tick)))

    async def _report(self, pos: pg_pitr.Position, shipped: Shipped, healthy: bool) -> None:
        held = pos.server_flush - (pos.slot_restart or pos.server_flush)
        await self.state(shipped_lsn=pg_pitr.lsn_text(shipped.lsn),
                         server_lsn=pg_pitr.lsn_text(pos.server_flush),
                         covers_until=_iso(shipped.covers_until) if shipped.covers_until
                         else "", slot_bytes=held, updated_at=_iso(datetime.now(UTC)),
                         **({"error": ""} if healthy else {}))

    async def _lag_alarm(self, pos: pg_pitr.Position) -> None:
        """pitr.lagging once when the slot holds more than lag_alarm_mb (again after it
        came back under): this worker's alarms outlive a streamer that fails and restarts
        while the archive is down."""
        if pos.slot_restart is None:
            return  # not known this tick (the slot between two holders): the alarm stays
        held = pos.server_flush - pos.slot_restart
        await self._lagging(
            held, f"replication slot {self.pitr.slot} holds {held >> 20} MiB of WAL on the "
                  f"server (alarm at {self.pitr.lag_alarm_mb} MiB): the archive is behind; "
                  "the server's disk fills until it catches up or PITR is disabled",
            {"slot_bytes": held})

    async def _lagging(self, held: int, message: str, data: dict[str, object]) -> None:
        """pitr.lagging once when `held` bytes the archive lacks pass lag_alarm_mb (again
        only after they came back under); `message` is said then."""
        alarm = held > self.pitr.lag_alarm_mb << 20
        if alarm and self.target.id not in self.alarms:
            await self._alert("pitr.lagging", message, data)
        (self.alarms.add if alarm else self.alarms.discard)(self.target.id)

    def _covered(self, lsn: int) -> datetime | None:
        """The last sampled instant whose server position is within `lsn`."""
        found = None
        for at, server in self.samples:
            if server <= lsn:
                found = at
        return found

    # ------------------------------------------------------------------ shipping
    async def _ship_upto(self, spool: Path, facts: pg_pitr.ServerFacts, shipped: Shipped,
                         upto: int) -> None:
        seg_bytes = facts.seg_bytes
        while shipped.lsn < upto:
            seg = pg_pitr.segment_name(shipped.timeline, shipped.lsn, seg_bytes)
            start = pg_pitr.segment_start(seg, seg_bytes)
            end = min(upto, start + seg_bytes)
            done, partial = spool / seg, spool / f"{seg}.partial"
            # (pg_receivewal renames .partial to the segment when it is complete)
            source = (done, partial, done)
            lo, hi = shipped.lsn - start, end - start
            covers = self._covered(end)
            async with SpoolRange(source, lo, hi) as region:
                await self._put("walpart", f"{seg}_{lo:08X}-{hi:08X}", region.chunks(),
                                {"plain_sha256": region.sha256,
                                 "timeline": shipped.timeline, "segment": seg, "start": lo,
                                 "end": hi, "start_lsn": pg_pitr.lsn_text(shipped.lsn),
                                 "end_lsn": pg_pitr.lsn_text(end),
                                 "covers_until": _iso(covers) if covers else None,
                                 "system_id": facts.system_id, "seg_bytes": seg_bytes,
                                 "fence": self.lease.fence})
            shipped.lsn = end
            if covers is not None:
                shipped.covers_until = covers

    async def _compact_done(self, spool: Path, facts: pg_pitr.ServerFacts,
                            shipped: Shipped) -> None:
        """Every segment pg_receivewal has completed (renamed from .partial) and whose
        bytes are all shipped: stored whole, its parts and spool copy removed. Looked
        for on every tick: the rename may come after its last bytes were shipped."""
        names = await asyncio.to_thread(lambda: sorted(p.name for p in spool.iterdir()))
        ready = [name for name in names if pg_pitr.SEGMENT_RE.match(name) and
                 pg_pitr.segment_start(name, facts.seg_bytes) + facts.seg_bytes <= shipped.lsn]
        if not ready:
            return
        archived = pieces(await self.catalog.list_backups(self.archive.id))
        for name in ready:
            await self._compact(name, spool / name, facts, shipped,
                                [p for p in archived if p.kind == "walpart"
                                 and p.segment == name and p.system_id == facts.system_id])

    async def _compact(self, seg: str, done: Path, facts: pg_pitr.ServerFacts,
                       shipped: Shipped, parts: list[ArchivedPiece]) -> None:
        """A complete segment: shipped whole (what a stock restore_command fetches), its
        parts deleted, the spool's copy removed."""
        async with SpoolRange(done) as whole:
            size = whole.size
            await self._put("wal", seg, whole.chunks(),
                            {"plain_sha256": whole.sha256,
                             "timeline": shipped.timeline, "segment": seg, "start": 0,
                             "end": size,
                             "start_lsn": pg_pitr.lsn_text(pg_pitr.segment_start(seg, size)),
                             "end_lsn": pg_pitr.lsn_text(
                                 pg_pitr.segment_start(seg, size) + size),
                             "covers_until": _iso(shipped.covers_until)
                             if shipped.covers_until else None,
                             "system_id": facts.system_id, "seg_bytes": facts.seg_bytes,
                             "fence": self.lease.fence})
        for piece in parts:
            with contextlib.suppress(SafeholdError):
                await self.catalog.delete(self.archive.id, naming.parse_stored(piece.filename))
        await asyncio.to_thread(done.unlink, True)

    async def _put(self, kind: str, ref: str, chunks: AsyncIterator[bytes],
                   facts: dict[str, object]) -> None:
        """One archive object on every destination (all of them, or it is not shipped:
        aborted, and the next tick sends the range again)."""
        await self.lease.refresh()  # fencing: no write after the lease is gone
        started = datetime.now(UTC)
        t0 = time.monotonic()
        stages = codecs.encoders(self.chain)
        name = naming.archive_name(kind, started, ref,
                                   codecs=[s["codec"] for s in self.chain])
        for seq in range(1, 100):
            try:
                fan = await self.catalog.begin(self.archive, name.with_seq(seq), "pitr")
                name = name.with_seq(seq)
                break
            except PipelineError as exc:
                if exc.code != "name_taken":
                    raise
        else:
            raise PipelineError(f"no free name for {name.filename}", code="name_taken")
        try:
            out = await pipeline.store(chunks, fan, stages, on_bytes=lambda n: None)
            outcomes = await fan.finish(out["size_bytes"], out["sha256"])
            if len(fan.live()) < len(outcomes):
                failed = ", ".join(n for n in outcomes if n not in fan.live())
                raise PipelineError(f"not stored on {failed}: retried at the next shipment",
                                    code="storage_failed")
            manifest = manifests.Manifest(
                name=name, target=self.target.id, created_at=started,
                finished_at=datetime.now(UTC), size_bytes=out["size_bytes"],
                sha256=out["sha256"], raw_bytes=out["raw_bytes"], chain=self.chain,
                destinations=outcomes, requested_by={"subject": "pitr", "via": "worker"},
                facts=facts,
                dump=manifests.DumpFacts(duration_s=time.monotonic() - t0,
                                         job=f"pitr:{self.lease.owner}"))
            await fan.publish(manifest)
            if len(fan.live()) < len(outcomes):
                raise PipelineError("a manifest could not be written everywhere",
                                    code="storage_failed")
        except BaseException:
            await asyncio.shield(fan.abort())
            with contextlib.suppress(Exception):  # a copy that published before the error
                await self.catalog.delete(self.archive.id, name)
            raise


    # ------------------------------------------------------------------ bases
    async def _bases(self, tools: Path, facts: pg_pitr.ServerFacts) -> None:
        """A base backup at once when the archive's current stretch of WAL has none (a new
        archive, or after a gap or a new timeline: older bases cannot reach it), then on
        base_schedule."""
        tz = schedules.zone(self.target.timezone, f"targets.{self.target.id}.timezone")
        while True:
            listing = await self.catalog.list_backups(self.archive.id)
            found = runs([p for p in pieces(listing) if p.system_id == facts.system_id])
            start = found[-1].start if found and found[-1].timeline == facts.timeline else 0
            newest = max((b.created_at for b in bases(listing)
                          if b.system_id == facts.system_id and b.timeline == facts.timeline
                          and b.start >= start), default=None)
            now = datetime.now(UTC)
            slot = schedules.latest_due(self.pitr.base_schedule, tz, now)
            if newest is None or (slot is not None and schedules.to_utc(slot, tz) > newest):
                await self.base(tools, facts)
            await self.prune(now)
            _still_wanted()
            await asyncio.sleep(30)

    async def prune(self, now: datetime) -> list[str]:
        """Keep the window `keep_days` long: bases consistent before its start go, but the
        newest of them (the window starts there); WAL before the oldest kept base goes."""
        listing = await self.catalog.list_backups(self.archive.id)
        now_archived = current(listing)
        kept = now_archived.bases
        cutoff = now - timedelta(days=self.pitr.keep_days)
        old = [b for b in kept if b.consistent_at < cutoff]
        doomed = [b.filename for b in old[:-1]]  # the newest old base still opens it
        oldest = [b for b in kept if b.filename not in doomed]
        if oldest:
            start = min(b.start for b in oldest)
            doomed += [p.filename for p in now_archived.pieces if p.end <= start]
        # a replaced server's archive (its LSNs are not comparable): by age alone
        mine = {p.filename for p in now_archived.pieces} | {b.filename for b in kept}
        doomed += [p.filename for p in pieces(listing) if p.filename not in mine
                   and p.created_at < cutoff]
        doomed += [b.filename for b in bases(listing) if b.filename not in mine
                   and b.consistent_at < cutoff]
        for filename in doomed:
            with contextlib.suppress(SafeholdError):
                await self.catalog.delete(self.archive.id, naming.parse_stored(filename))
        if doomed:
            log.info("pitr %s: pruned %d archive object(s) older than %.1f days",
                     self.target.id, len(doomed), self.pitr.keep_days)
        return doomed

    async def base(self, tools: Path, facts: pg_pitr.ServerFacts) -> None:
        """pg_basebackup → pg_verifybackup → tar → the archive (a `base` object)."""
        started = datetime.now(UTC)
        await self.state(base_running=_iso(started))
        try:
            async with scratch.work_dir("base") as work:
                made = await pg_pitr.base_backup(self.target, tools, work / "data")
                async with pg_pitr.tar_stream(work / "data") as child:
                    async def chunks() -> AsyncIterator[bytes]:
                        while block := await child.read():
                            yield block
                        if await child.wait() != 0:
                            raise PipelineError(f"tar failed: {child.error_text()}",
                                                code="pitr_base_failed")
                    await self._put("base", "", chunks(), {
                        "timeline": made.timeline,
                        "start_lsn": pg_pitr.lsn_text(made.start_lsn),
                        "end_lsn": pg_pitr.lsn_text(made.end_lsn),
                        "consistent_at": _iso(datetime.now(UTC)),
                        "started_at": _iso(started),
                        "files": made.files, "verified": "pg_verifybackup",
                        "system_id": facts.system_id, "server_major": facts.major,
                        "layout": "tar of a pg_basebackup plain data directory (-X stream)",
                        "fence": self.lease.fence})
                log.info("pitr %s: base backup %s..%s archived", self.target.id,
                         pg_pitr.lsn_text(made.start_lsn), pg_pitr.lsn_text(made.end_lsn))
        finally:
            await self.state(base_running="")


def _still_wanted() -> None:
    """A loop asked to stop stops here, even if a library it awaited swallowed the
    CancelledError (a cancelled task must never start another round)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _together(*coros: Coroutine[object, object, None]) -> None:
    """Run side by side until one ends: the others are cancelled (and awaited), and the
    first one's error is raised as itself (not wrapped in an ExceptionGroup, which the
    service's error handling would not recognise)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=30)
    for t in done:
        if not t.cancelled() and (exc := t.exception()) is not None:
            raise exc


class SpoolRange:
    """`head`, then bytes [lo, hi) of a spool file (hi None: to its end), read back a MiB
    at a time — never whole in memory (a WAL segment or a binlog file can be 1 GiB, an
    event hundreds of MiB). The file is opened once, so a rename (pg_receivewal's
    `.partial` → the segment) cannot pull it away between its checksum and its upload
    (`paths`: the names it may have, tried in order). `size` and `sha256` are known on
    entry; the upload's bytes are checked against them as they go."""

    def __init__(self, paths: Path | tuple[Path, ...], lo: int = 0, hi: int | None = None,
                 head: bytes = b"") -> None:
        self.paths = paths if isinstance(paths, tuple) else (paths,)
        self.path, self.lo, self.hi, self.head = self.paths[0], lo, hi, head
        self.size, self.sha256 = 0, ""
        self._f: BinaryIO | None = None

    async def __aenter__(self) -> SpoolRange:
        for i, path in enumerate(self.paths):
            try:
                self._f = await asyncio.to_thread(open, path, "rb")
                self.path = path
                break
            except FileNotFoundError:
                if i == len(self.paths) - 1:
                    raise
        assert self._f is not None
        try:
            digest, size = hashlib.sha256(self.head), len(self.head)
            async for chunk in self._read():
                digest.update(chunk)
                size += len(chunk)
        except BaseException:
            await asyncio.to_thread(self._f.close)
            raise
        if self.hi is not None and size != len(self.head) + self.hi - self.lo:
            await asyncio.to_thread(self._f.close)
            raise PipelineError(f"{self.path.name} holds {self.lo + size - len(self.head)} "
                                f"bytes, not {self.hi}", code="pitr_spool")
        self.size, self.sha256 = size, digest.hexdigest()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._f is not None:
            await asyncio.to_thread(self._f.close)

    async def _read(self) -> AsyncIterator[bytes]:
        f = self._f
        assert f is not None
        await asyncio.to_thread(f.seek, self.lo)
        left = None if self.hi is None else self.hi - self.lo
        while left is None or left > 0:
            chunk = await asyncio.to_thread(f.read, 1 << 20 if left is None
                                            else min(1 << 20, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        digest, size = hashlib.sha256(self.head), len(self.head)
        if self.head:
            yield self.head
        async for chunk in self._read():
            digest.update(chunk)
            size += len(chunk)
            yield chunk
        if (size, digest.hexdigest()) != (self.size, self.sha256):
            raise PipelineError(f"{self.path.name} changed while it was shipped",
                                code="pitr_spool")


def _iso(at: datetime | None) -> str:
    return "" if at is None else at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PitrService:
    """Every PITR target of this worker's config: take the lease when it is free, stream
    while it is held, let go on any failure (another worker, or this one, retries)."""

    def __init__(self, settings: Settings, redis: Redis, catalog: Catalog,
                 notifier: Notifier, worker_id: str) -> None:
        self.settings, self.redis, self.catalog = settings, redis, catalog
        self.notifier, self.worker_id = notifier, worker_id
        self.alarms: set[str] = set()
        self.keys = Keys(settings.redis.prefix)
        self.targets = [t for t in settings.targets.values()
                        if t.pitr is not None and t.pitr.enabled]

    async def run(self) -> None:
        for target in self.settings.targets.values():
            if target.pitr is not None and not target.pitr.enabled and \
                    target.engine == "postgresql":  # (a binlog stream holds nothing)
                await self._disabled(target)
        if self.targets:
            await asyncio.gather(*(self._hold(t) for t in self.targets))

    async def _disabled(self, target: TargetConfig) -> None:
        """PITR switched off: its slot is dropped, so the server keeps no WAL for it (tried
        again for a minute: a session that last advanced it may still hold it a moment,
        or the server may be restarting)."""
        assert target.pitr is not None
        for attempt in range(30):
            try:
                if await pg_pitr.drop_slot(target, target.pitr.slot):
                    log.warning("pitr %s: disabled; replication slot %s dropped", target.id,
                                target.pitr.slot)
                return
            except (SafeholdError, asyncpg.PostgresError, OSError) as exc:
                if attempt == 29:
                    log.warning("pitr %s: disabled, but its slot %s could not be dropped: %s",
                                target.id, target.pitr.slot, exc)
                    return
            await asyncio.sleep(2.0)

    async def _hold(self, target: TargetConfig) -> None:
        while True:
            lease = Lease(self.redis, self.keys, target.id, self.worker_id)
            try:
                if not await lease.try_acquire():
                    await asyncio.sleep(WAIT_S)
                    continue
                kind = Streamer
                if target.engine == "mysql":
                    from worker.binlog_archive import BinlogStreamer
                    kind = BinlogStreamer
                streamer = kind(self.settings, target, self.redis, self.keys,
                                self.catalog, self.notifier, lease, self.alarms)
                try:
                    await _together(streamer.run(), lease.keep())
                finally:
                    await asyncio.shield(lease.release())
            except asyncio.CancelledError:
                raise
            except LeaseLost as exc:
                log.warning("pitr %s: %s", target.id, exc)
            except (SafeholdError, asyncpg.PostgresError, pymysql.err.MySQLError, OSError,
                    RedisError) as exc:
                why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                log.warning("pitr %s: streaming stopped: %s", target.id, why)
                with contextlib.suppress(RedisError, OSError):
                    await rcmd.hset(self.redis, self.keys.pitr(target.id, "state"), mapping=
                                         {"error": str(why)[:500],
                                          "error_at": _iso(datetime.now(UTC))})
            except Exception:
                log.exception("pitr %s: streaming failed", target.id)
            _still_wanted()
            await asyncio.sleep(2.0)
