"""Retention: which backups a policy keeps, and why — a pure function.

Semantics are restic's `forget --keep-*`:

* `keep_last = n`: the n newest backups.
* `max_age = "30d"`: every backup within that of the newest one (restic's
  `--keep-within`: measured from the newest backup, so an outage never empties the store).
* `hourly`/`daily`/`weekly`/`monthly`/`yearly = n`: walking from the newest backup to the
  oldest, the first (newest) backup of each hour/day/ISO week/month/year is kept, for the
  n most recent periods that have a backup; `-1` means every period, forever.

Periods are computed in the target's time zone. A backup is kept if any rule keeps it; each
kept backup carries the reasons (`daily 2026-11-20`). The newest backup is always kept,
whatever the policy. Everything here is deterministic and side-effect free; the prune job
applies the plan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from shared.errors import ConfigError

BUCKETS = ("hourly", "daily", "weekly", "monthly", "yearly")
KEYS = ("keep_last", "max_age", *BUCKETS)
_AGE = re.compile(r"^(\d+)([hdwmy])\Z")
_AGE_UNITS = {"h": 1 / 24, "d": 1, "w": 7, "m": 30, "y": 365}


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0
    max_age: timedelta | None = None
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    @property
    def empty(self) -> bool:
        return not (self.keep_last or self.max_age or any(getattr(self, b) for b in BUCKETS))

    def public(self) -> dict[str, object]:
        out: dict[str, object] = {k: getattr(self, k) for k in ("keep_last", *BUCKETS)
                               if getattr(self, k)}
        if self.max_age is not None:
            out["max_age"] = f"{int(self.max_age.total_seconds() // 3600)}h"
        return out


def parse_age(value: object, where: str) -> timedelta:
    m = _AGE.match(str(value).strip())
    if not m:
        raise ConfigError(f"{where} must look like 36h, 30d, 8w, 6m or 1y, got {value!r}")
    return timedelta(days=int(m[1]) * _AGE_UNITS[m[2]])


def parse_policy(raw: Mapping[str, object], where: str) -> Policy:
    """A policy from its config table; every error names the key."""
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(KEYS)})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "max_age":
            values[key] = parse_age(value, f"{where}.max_age")
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise ConfigError(f"{where}.{key} must be a whole number (-1 = forever), "
                              f"got {value!r}")
        if key == "keep_last" and value == -1:
            raise ConfigError(f"{where}.keep_last must be 0 or more")
        values[key] = value
    return Policy(**values)


def period(bucket: str, at: datetime) -> str:
    """The period of `at` (already in the target's zone) for a bucket, as a label."""
    if bucket == "hourly":
        return at.strftime("%Y-%m-%d %H:00")
    if bucket == "daily":
        return at.strftime("%Y-%m-%d")
    if bucket == "weekly":
        year, week, _ = at.isocalendar()
        return f"{year}-W{week:02d}"
    if bucket == "monthly":
        return at.strftime("%Y-%m")
    return at.strftime("%Y")


@dataclass
class Decision:
    filename: str
    created_at: datetime
    keep: bool = False
    reasons: list[str] = field(default_factory=list)

    def public(self) -> dict[str, object]:
        return {"filename": self.filename, "created_at": self.created_at.isoformat(),
                "action": "keep" if self.keep else "delete",
                "reasons": self.reasons or ["no rule keeps it"]}


def plan(backups: Sequence[tuple[str, datetime]], policy: Policy, now: datetime,
         tz: str = "UTC") -> list[Decision]:
    """Keep/delete for each (filename, created_at) backup, newest first. `created_at` and
    `now` must be aware datetimes. An empty policy keeps everything."""
    zone = ZoneInfo(tz)
    ordered = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)
    decisions = [Decision(name, at) for name, at in ordered]
    if policy.empty:
        for d in decisions:
            d.keep, d.reasons = True, ["no retention policy"]
        return decisions
    for i, d in enumerate(decisions):
        if i < policy.keep_last:
            d.reasons.append(f"last {policy.keep_last}")
        # restic's --keep-within: measured from the newest backup, not from now, so an
        # outage longer than max_age never empties the store
        if policy.max_age is not None and decisions[0].created_at - d.created_at < \
                policy.max_age:
            d.reasons.append(f"younger than {policy.public()['max_age']}")
    for bucket in BUCKETS:
        n = getattr(policy, bucket)
        if not n:
            continue
        seen: set[str] = set()
        for d in decisions:
            label = period(bucket, d.created_at.astimezone(zone))
            if label in seen:
                continue
            if n != -1 and len(seen) >= n:
                break
            seen.add(label)
            d.reasons.append(f"{bucket} {label}")
    if decisions and not decisions[0].reasons:
        decisions[0].reasons.append("the newest backup")
    for d in decisions:
        d.keep = bool(d.reasons)
    return decisions


# safety backups and uploads: kept 7 days (and the newest always), whatever the policy
AUX_POLICY = Policy(max_age=timedelta(days=7))


def plan_destination(manifests: Sequence[Mapping[str, object]], policy: Policy, now: datetime,
                     tz: str = "UTC") -> list[Decision]:
    """What a prune would do on one destination: regular backups by `policy`, safety
    backups and uploads by AUX_POLICY. Time comes from the name (a manifest only agrees
    with it); a damaged manifest decides nothing: its backup is neither kept nor deleted."""
    from shared import naming

    decisions: list[Decision] = []
    for regular, rule in ((True, policy), (False, AUX_POLICY)):
        group = [(str(m["filename"]), naming.parse(str(m["filename"])).created_at)
                 for m in manifests if not m.get("damaged")
                 and (m.get("kind") == "backup") == regular]
        decisions += plan(group, rule, now, tz)
    return decisions
