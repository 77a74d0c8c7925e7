"""`GET /metrics`: Prometheus exposition (prometheus-client) of what an operator alerts on.

Public unless `auth.public_metrics = false` (then a viewer token is needed; a target-scoped
token sees its targets only). A scrape reads a few Redis hashes kept by the workers
(`shared/stats.py`) and the backup catalog from a per-process cache that is refreshed only
when the catalog generation changes (a job finished, an upload, a delete) — never every
manifest per scrape (`bench/metrics.py`: 10,000 backups).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from api.auth import bearer_token, require
from api.context import SERVICES, Services
from api.http import live_workers
from api.roles import Role
from shared import rcmd
from shared.errors import Unavailable
from shared.jobs import JobKind
from shared.manifests import ManifestDoc
from shared.stats import DURATION_BUCKETS

CATALOG_CACHE = web.AppKey("catalog_cache", dict)


@dataclass
class _Cached:
    generation: bytes | None = b"never read"
    at: float = 0.0
    manifests: list[ManifestDoc] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    # one re-read at a time: 100 concurrent scrapes of a changed catalog read it once
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _ts(iso: object) -> float | None:
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


async def _manifests(request: web.Request, s: Services, target: str
                     ) -> tuple[list[ManifestDoc], list[str]] | None:
    """The target's listing and its unreachable destinations (None: none answers),
    re-read only when the catalog changed (or after 10 minutes: files put in place by
    hand); a listing that missed a destination is read again at the next scrape."""
    cache: dict[str, _Cached] = request.app[CATALOG_CACHE]
    gen = await s.redis.get(s.keys.metric("catalog_generation"))
    entry = cache.setdefault(target, _Cached())

    def stale() -> bool:
        return bool(entry.generation != gen or time.monotonic() - entry.at > 600
                    or entry.unavailable)

    if stale():
        async with entry.lock:
            if stale():
                try:
                    entry.manifests, entry.unavailable = await s.catalog.listing(target)
                except Unavailable:
                    entry.generation = b"never read"
                    return None
                entry.generation, entry.at = gen, time.monotonic()
    return entry.manifests, entry.unavailable


class _Snapshot:
    """The figures of one scrape, collected beforehand (collectors are synchronous)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> list[Metric]:
        return self.families


async def _job_families(s: Services, visible: list[str]) -> list[Metric]:
    """Jobs finished and their durations, bytes written: counted as jobs end."""
    out: list[Metric] = []
    add = out.append

    jobs = CounterMetricFamily("safehold_jobs", "Jobs finished, by kind, status and target.",
                               labels=["kind", "status", "target"])
    for field_, done in (await rcmd.hgetall(s.redis, s.keys.metric("jobs"))).items():
        kind, status, target = field_.decode().split("|", 2)
        if target in visible:
            jobs.add_metric([kind, status, target], int(done))
    add(jobs)

    hist = HistogramMetricFamily("safehold_job_duration_seconds",
                                 "Job durations, by kind and engine.", labels=["kind", "engine"])
    engines = {s.settings.targets[t].engine for t in visible}
    for kind in (k for k in JobKind if k != JobKind.STATS):
        for engine in sorted(engines):
            raw = await rcmd.hgetall(s.redis, s.keys.metric(f"duration:{kind}|{engine}"))
            if not raw:
                continue
            got = {k.decode(): v for k, v in raw.items()}
            buckets = [(f"{le:g}", int(got.get(f"{le:g}", 0))) for le in DURATION_BUCKETS]
            buckets.append(("+Inf", int(got.get("count", 0))))
            hist.add_metric([kind, engine], buckets, float(got.get("sum", 0)))
    add(hist)

    written = CounterMetricFamily("safehold_backup_bytes_written",
                                  "Stored bytes of finished backups, by target.",
                                  labels=["target"])
    for tkey, total in (await rcmd.hgetall(s.redis, s.keys.metric("bytes_written"))).items():
        if tkey.decode() in visible:
            written.add_metric([tkey.decode()], int(total))
    add(written)
    return out


async def _service_families(s: Services) -> list[Metric]:
    """Workers alive, queue depth, notifications lost."""
    out: list[Metric] = []
    add = out.append
    add(GaugeMetricFamily("safehold_workers_alive", "Workers that heartbeat in the last 30 s.",
                          value=await live_workers(s)))
    add(GaugeMetricFamily("safehold_queue_depth", "Jobs waiting in the queue.",
                          value=await s.redis.zcard(s.keys.queue)))
    add(CounterMetricFamily("safehold_notifications_failed",
                            "Notification deliveries that failed after every retry.",
                            value=int(await s.redis.get(s.keys.counter(
                                "notifications_failed")) or 0)))
    return out


async def _pitr_families(s: Services, visible: list[str]) -> list[Metric]:
    """PITR targets: how far the archive is behind, the WAL the slot holds on the server,
    whether a streamer reports (what its streamer last wrote to Redis)."""
    lag = GaugeMetricFamily("safehold_pitr_lag_seconds", "Seconds the WAL or binlog archive "
                            "is behind (now minus the last instant fully archived).",
                            labels=["target"])
    slot = GaugeMetricFamily("safehold_pitr_slot_bytes", "WAL the replication slot holds on "
                             "the server, or binlog it wrote that the archive lacks (grows "
                             "while the archive is down).",
                             labels=["target"])
    streaming = GaugeMetricFamily("safehold_pitr_streaming", "1 while a worker streams the "
                                  "target's WAL (reported in the last 10 s).", labels=["target"])
    now = datetime.now(UTC)
    for tid in visible:
        pitr = s.settings.targets[tid].pitr
        if pitr is None or not pitr.enabled:
            continue
        state = await rcmd.hgetall_text(s.redis, s.keys.pitr(tid, "state"))
        if at := _when(state.get("covers_until")):
            lag.add_metric([tid], max(0.0, (now - at).total_seconds()))
        if state.get("slot_bytes", "").isdigit():
            slot.add_metric([tid], int(state["slot_bytes"]))
        beat = _when(state.get("updated_at"))
        streaming.add_metric([tid], 1 if beat and (now - beat).total_seconds() < 10 else 0)
    return [lag, slot, streaming]


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class _TargetFamilies:
    """Per target: what its destinations list (never a false 0 for one that did not
    answer), the newest backup and drill, the schedule's health."""

    def __init__(self) -> None:
        self.count = GaugeMetricFamily("safehold_backups", "Listed backups (all kinds).",
                                  labels=["target"])
        self.size = GaugeMetricFamily("safehold_backup_bytes", "Bytes of listed backups.",
                                 labels=["target"])
        self.per_dest = GaugeMetricFamily("safehold_destination_backups",
                                     "Listed backups per destination.",
                                     labels=["target", "destination"])
        self.dest_last = GaugeMetricFamily("safehold_destination_last_backup_timestamp_seconds",
                                      "Creation time of the newest regular backup a destination "
                                      "holds.", labels=["target", "destination"])
        self.dest_size = GaugeMetricFamily("safehold_destination_last_backup_size_bytes",
                                      "Stored size of that backup.",
                                      labels=["target", "destination"])
        self.last = GaugeMetricFamily("safehold_last_backup_timestamp_seconds",
                                 "Creation time of the newest regular backup.", labels=["target"])
        self.last_size = GaugeMetricFamily("safehold_last_backup_size_bytes",
                                      "Stored size of the newest regular backup.",
                                      labels=["target"])
        self.verified = GaugeMetricFamily("safehold_last_verify_timestamp_seconds",
                                     "When the newest drill ran.", labels=["target"])
        self.passed = GaugeMetricFamily("safehold_last_verify_passed",
                                   "1 if the newest drill passed, 0 if it failed.",
                                   labels=["target"])
        self.rto = GaugeMetricFamily("safehold_last_verify_rto_seconds",
                                "Restore time measured by the newest drill.", labels=["target"])
        self.missed = GaugeMetricFamily("safehold_schedule_missed",
                                   "1 while a scheduled target has had no successful backup "
                                   "within its grace.", labels=["target"])
        self.lag = GaugeMetricFamily("safehold_schedule_lag_seconds",
                                "How late the last scheduled job started (so far, if waiting).",
                                labels=["target"])
        self.last_ok = GaugeMetricFamily("safehold_last_success_timestamp_seconds",
                                    "When the last backup of a scheduled target succeeded.",
                                    labels=["target"])
        self.up = GaugeMetricFamily("safehold_destination_up",
                               "1 if the destination answered the last listing of the target, "
                               "0 if not (its backups are then not counted: no false 0).",
                               labels=["target", "destination"])
        self.damaged = GaugeMetricFamily("safehold_backups_damaged",
                                    "Listed backups whose manifest disagrees with the backup.",
                                    labels=["target"])

    def families(self) -> list[Metric]:
        return [self.count, self.size, self.up, self.damaged, self.per_dest, self.dest_last,
                self.dest_size, self.last, self.last_size, self.verified, self.passed,
                self.rto, self.missed, self.lag, self.last_ok]

    def storage(self, s: Services, target: str,
                listed: tuple[list[ManifestDoc], list[str]] | None) -> None:
        for d in s.settings.targets[target].destinations:
            self.up.add_metric([target, d], 0 if listed is None or d in listed[1] else 1)
        manifests = listed[0] if listed is not None else []
        if listed is not None:
            self.count.add_metric([target], len(manifests))
            self.size.add_metric([target], sum(int(m.get("size_bytes") or 0) for m in manifests))
            self.damaged.add_metric([target], sum(1 for m in manifests if m.get("damaged")))
        dests: dict[str, int] = {}
        newest_on: dict[str, ManifestDoc] = {}  # manifests are newest first
        for m in manifests:
            for d in m.get("stored_on") or []:
                dests[d] = dests.get(d, 0) + 1
                if m.get("kind") == "backup":
                    newest_on.setdefault(d, m)
        for d, n in sorted(dests.items()):
            self.per_dest.add_metric([target, d], n)
        for d, m in sorted(newest_on.items()):
            if (t := _ts(m.get("created_at"))) is not None:
                self.dest_last.add_metric([target, d], t)
                self.dest_size.add_metric([target, d], int(m.get("size_bytes") or 0))
        regular = [m for m in manifests if m.get("kind") == "backup"]
        if regular and (t := _ts(regular[0].get("created_at"))) is not None:
            self.last.add_metric([target], t)
            self.last_size.add_metric([target], int(regular[0].get("size_bytes") or 0))
        drills = sorted((m for m in manifests if m.get("verified_at")),
                        key=lambda m: str(m["verified_at"]), reverse=True)
        if drills and (t := _ts(drills[0]["verified_at"])) is not None:
            found = drills[0].get("verification")
            v = found if isinstance(found, dict) else {}
            self.verified.add_metric([target], t)
            self.passed.add_metric([target], 1 if v.get("outcome") == "passed" else 0)
            if isinstance(rto := v.get("rto_s"), int | float):
                self.rto.add_metric([target], float(rto))

    async def schedule(self, s: Services, target: str) -> None:
        state = await rcmd.hgetall(s.redis, s.keys.schedule(target))
        self.missed.add_metric([target], 1 if state.get(b"missed_alerted") else 0)
        if state.get(b"last_job") and (job := await s.store.find(
                state[b"last_job"].decode())) and job.params.get("scheduled_for"):
            due = _ts(job.params["scheduled_for"])
            began = _ts(job.started_at) if job.started_at else time.time()
            if due is not None and began is not None:
                self.lag.add_metric([target], max(began - due, 0.0))
        if (t := _ts(state.get(b"last_success", b"").decode())) is not None:
            self.last_ok.add_metric([target], t)


async def metrics(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    visible = list(s.settings.targets)
    if not s.settings.auth.public_metrics:
        principal = await s.verifier.verify(bearer_token(request.headers.get("Authorization")))
        require(principal, Role.VIEWER, None)
        visible = principal.targets_visible(visible)
    snap = _Snapshot()
    snap.families += await _job_families(s, visible)
    snap.families += await _service_families(s)
    snap.families += await _pitr_families(s, visible)
    per_target = _TargetFamilies()
    for target in visible:
        per_target.storage(s, target, await _manifests(request, s, target))
        if s.settings.targets[target].schedule:
            await per_target.schedule(s, target)
    snap.families += per_target.families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(snap)  # type: ignore[arg-type]
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST,
                                 "X-Content-Type-Options": "nosniff"})
