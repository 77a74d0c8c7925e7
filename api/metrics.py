"""`GET /metrics`: Prometheus text exposition of what an operator alerts on.

Public unless `auth.public_metrics = false` (then a viewer token is needed). Figures come
from the job records (the last `worker.job_ttl`), the live-worker set and the storage
manifests — the same sources the API answers from.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from aiohttp import web

from api.auth import bearer_token, require
from api.context import SERVICES
from api.handlers import live_workers
from api.roles import Role


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _ts(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


async def metrics(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    visible = list(s.settings.targets)
    if not s.settings.auth.public_metrics:  # then a target-scoped token sees its targets only
        principal = await s.verifier.verify(bearer_token(request.headers.get("Authorization")))
        require(principal, Role.VIEWER, None)
        visible = principal.targets_visible(visible)
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], Any]]
               ) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {value}" if labels else f"{name} {value}")

    jobs = await s.store.list_jobs(limit=10_000, targets=set(visible))
    counts = Counter((j.kind, j.status, j.target) for j in jobs)
    metric("safehold_jobs", "gauge", "Jobs kept in Redis, by kind, status and target.",
           [({"kind": k, "status": st, "target": t}, n)
            for (k, st, t), n in sorted(counts.items())])
    workers = await live_workers(s)
    metric("safehold_workers_alive", "gauge", "Workers that heartbeat in the last 30 s.",
           [({}, workers)])
    count, size, last = [], [], []
    for target in visible:
        manifests = await s.catalog.list_backups(target)
        regular = [m for m in manifests if m.get("kind") == "backup"]
        count.append(({"target": target}, len(manifests)))
        size.append(({"target": target}, sum(int(m.get("size_bytes") or 0) for m in manifests)))
        newest = max((t for m in regular if (t := _ts(str(m.get("created_at", ""))))),
                     default=None)
        if newest is not None:
            last.append(({"target": target}, f"{newest:.0f}"))
    metric("safehold_backups", "gauge", "Listed backups per target (all kinds).", count)
    metric("safehold_backup_bytes", "gauge", "Bytes of listed backups per target.", size)
    metric("safehold_last_backup_timestamp_seconds", "gauge",
           "Creation time of the newest complete regular backup per target.", last)
    missed, last_ok = [], []
    for target in visible:
        state = await s.redis.hgetall(s.keys.schedule(target))  # type: ignore[misc]
        if not s.settings.targets[target].schedule:
            continue
        missed.append(({"target": target}, 1 if state.get(b"missed_alerted") else 0))
        if (ok := _ts(state.get(b"last_success", b"").decode())) is not None:
            last_ok.append(({"target": target}, f"{ok:.0f}"))
    metric("safehold_schedule_missed", "gauge",
           "1 while a scheduled target has had no successful backup within its grace.", missed)
    metric("safehold_last_success_timestamp_seconds", "gauge",
           "When the last backup of a scheduled target succeeded.", last_ok)
    failed = int(await s.redis.get(s.keys.counter("notifications_failed")) or 0)
    metric("safehold_notifications_failed_total", "counter",
           "Notification deliveries that failed after every retry.", [({}, failed)])
    return web.Response(text="\n".join(lines) + "\n",
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})
