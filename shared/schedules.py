"""Cron schedules of targets: validation and slot arithmetic (pure; the worker's scheduler
uses it to enqueue, the API to show next runs).

Slots are computed in the target's wall-clock time (naive local datetimes through croniter)
and only then placed in its time zone, so DST behaves as people expect: a 02:30 job on the
spring-forward day runs once (at 03:30, the same instant that 02:30 would have been), and on
the fall-back day once (at the first 02:30). A slot is named by its local wall time
(`2026-03-29T02:30`), which is also what makes its job id deterministic.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.errors import ConfigError

FIELDS = ("minute", "hour", "day of month", "month", "day of week")
ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
           "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
           "@hourly": "0 * * * *"}


def expand(expr: str) -> str:
    return ALIASES.get(expr.strip().lower(), expr.strip())


def validate(expr: str, where: str) -> str:
    """The crontab expression, or ConfigError naming the offending field."""
    from croniter import croniter

    text = expand(expr)
    parts = text.split()
    if len(parts) != 5:
        raise ConfigError(f"{where} must have 5 fields (minute hour day-of-month month "
                          f"day-of-week) or be one of {', '.join(sorted(ALIASES))}; got "
                          f"{expr!r}")
    for i, part in enumerate(parts):
        probe = ["*"] * 5
        probe[i] = part
        if not croniter.is_valid(" ".join(probe)):
            raise ConfigError(f"{where}: the {FIELDS[i]} field {part!r} is not valid "
                              f"in {expr!r}")
    if not croniter.is_valid(text):
        raise ConfigError(f"{where}: {expr!r} is not a valid crontab expression")
    return text


def zone(name: str, where: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where} must be an IANA time zone like Europe/Berlin or UTC, "
                          f"got {name!r}") from None


def slot_name(slot: datetime) -> str:
    return slot.strftime("%Y-%m-%dT%H:%M")


def to_utc(slot: datetime, tz: ZoneInfo) -> datetime:
    """A naive local slot as an instant (fold=0: the first of a repeated hour; a time in a
    spring-forward gap lands where the clock jumped to)."""
    return slot.replace(tzinfo=tz).astimezone(UTC)


def jitter(target: str, seconds: int) -> timedelta:
    """A fixed per-target delay in [0, seconds): spreads many targets, same every time."""
    if seconds <= 0:
        return timedelta(0)
    h = int.from_bytes(hashlib.sha256(target.encode()).digest()[:4], "big")
    return timedelta(seconds=h % seconds)


def latest_due(expr: str, tz: ZoneInfo, now: datetime, delay: timedelta = timedelta(0)
               ) -> datetime | None:
    """The newest naive local slot whose due time (slot + delay) is not after `now`."""
    from croniter import croniter

    local_now = (now - delay).astimezone(tz).replace(tzinfo=None)
    it = croniter(expand(expr), local_now + timedelta(seconds=1))
    slot: datetime = it.get_prev(datetime)
    # a wall time that does not map back (spring-forward gap) is still one slot: its
    # instant is after the gap; if that instant is later than now, it is not due yet
    while to_utc(slot, tz) + delay > now:
        slot = it.get_prev(datetime)
    return slot


def next_due(expr: str, tz: ZoneInfo, now: datetime, delay: timedelta = timedelta(0)
             ) -> datetime:
    """The instant (UTC) of the next slot due after `now`."""
    from croniter import croniter

    local_now = (now - delay).astimezone(tz).replace(tzinfo=None)
    it = croniter(expand(expr), local_now)
    while True:
        slot: datetime = it.get_next(datetime)
        due = to_utc(slot, tz) + delay
        if due > now:
            return due
