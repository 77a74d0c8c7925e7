"""Retention as a pure function: restic's --keep-* semantics, checked by properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError
from shared.retention import BUCKETS, Policy, parse_policy, plan

START = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

stamps = st.lists(st.integers(min_value=0, max_value=int((NOW - START).total_seconds())),
                  min_size=0, max_size=60, unique=True)
counts = st.integers(min_value=-1, max_value=5)
policies = st.builds(
    Policy, keep_last=st.integers(0, 4),
    max_age=st.one_of(st.none(), st.integers(1, 400).map(lambda d: timedelta(days=d))),
    hourly=counts, daily=counts, weekly=counts, monthly=counts, yearly=counts)
zones = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata",
                         "Pacific/Chatham"])


def backups(seconds: list[int]) -> list[tuple[str, datetime]]:
    return [(f"b{s}", START + timedelta(seconds=s)) for s in seconds]


def kept(decisions: list) -> set[str]:  # type: ignore[type-arg]
    return {d.filename for d in decisions if d.keep}


@settings(max_examples=300, deadline=None)
@given(stamps, policies, zones)
def test_never_deletes_the_newest(seconds: list[int], policy: Policy, tz: str) -> None:
    items = backups(seconds)
    decisions = plan(items, policy, NOW, tz)
    if items:
        newest = max(items, key=lambda b: (b[1], b[0]))[0]
        assert newest in kept(decisions)
    assert {d.filename for d in decisions} == {n for n, _ in items}
    assert all(d.reasons for d in decisions if d.keep)


@settings(max_examples=300, deadline=None)
@given(stamps, policies, zones)
def test_idempotent(seconds: list[int], policy: Policy, tz: str) -> None:
    """Pruning what a prune kept deletes nothing more."""
    items = backups(seconds)
    first = kept(plan(items, policy, NOW, tz))
    again = plan([b for b in items if b[0] in first], policy, NOW, tz)
    assert kept(again) == first


@settings(max_examples=300, deadline=None)
@given(stamps, policies, zones, st.integers(1, 86400 * 3))
def test_a_newer_backup_never_resurrects_a_deleted_one(seconds: list[int], policy: Policy,
                                                       tz: str, later: int) -> None:
    items = backups(seconds)
    before = kept(plan(items, policy, NOW, tz))
    newest = max((b[1] for b in items), default=START)
    new = ("new", newest + timedelta(seconds=later))
    after = kept(plan([*items, new], policy, max(NOW, new[1]), tz))
    assert after - {"new"} <= before


@settings(max_examples=300, deadline=None)
@given(stamps, policies, zones)
def test_bucket_counts_never_exceed_the_policy(seconds: list[int], policy: Policy,
                                               tz: str) -> None:
    decisions = plan(backups(seconds), policy, NOW, tz)
    for bucket in BUCKETS:
        n = getattr(policy, bucket)
        labels = [r for d in decisions for r in d.reasons if r.startswith(f"{bucket} ")]
        assert len(labels) == len(set(labels))  # one backup per period
        if n >= 0:
            assert len(labels) <= n
    last = [d for d in decisions if f"last {policy.keep_last}" in d.reasons]
    assert len(last) <= policy.keep_last


@settings(max_examples=200, deadline=None)
@given(stamps, policies, zones, zones)
def test_stable_across_the_zones_timestamps_are_written_in(
        seconds: list[int], policy: Policy, tz: str, written_in: str) -> None:
    """Periods follow the target's zone, whatever zone the timestamps come in."""
    items = backups(seconds)
    shifted = [(n, at.astimezone(ZoneInfo(written_in))) for n, at in items]
    assert [d.public()["action"] for d in plan(items, policy, NOW, tz)] == \
        [d.public()["action"] for d in plan(shifted, policy, NOW, tz)]


def test_the_seeds_policy_on_two_years_of_nightly_backups() -> None:
    """7 daily, 4 weekly, 12 monthly, yearly forever (the seed README's rotation)."""
    nights = [(f"n{i}", datetime(2025, 1, 1, 2, 0, tzinfo=UTC) + timedelta(days=i))
              for i in range(700)]
    now = nights[-1][1] + timedelta(hours=1)
    policy = parse_policy({"daily": 7, "weekly": 4, "monthly": 12, "yearly": -1}, "r")
    decisions = plan(nights, policy, now)
    keep = [d for d in decisions if d.keep]
    assert [d.filename for d in decisions[:7]] == [f"n{i}" for i in range(699, 692, -1)]
    assert all(d.keep for d in decisions[:7])
    # 7 days + 3 more weeks (the newest week is the daily one) + 11 more months + 2 years
    assert 20 <= len(keep) <= 24
    assert any(r.startswith("yearly 2025") for d in keep for r in d.reasons)
    assert decisions[0].reasons[0] == "daily 2026-12-01"


def test_time_zone_decides_the_day() -> None:
    """23:30 and 00:30 UTC are two days in UTC, one day in New York."""
    items = [("a", datetime(2026, 5, 1, 23, 30, tzinfo=UTC)),
             ("b", datetime(2026, 5, 2, 0, 30, tzinfo=UTC))]
    policy = Policy(daily=5)
    assert kept(plan(items, policy, NOW, "UTC")) == {"a", "b"}
    assert kept(plan(items, policy, NOW, "America/New_York")) == {"b"}


@pytest.mark.parametrize("raw, message", [
    ({"daily": "7"}, "daily must be a whole number"), ({"daily": -2}, "daily"),
    ({"keep_last": -1}, "keep_last must be 0 or more"), ({"max_age": "30 days"}, "max_age"),
    ({"dayly": 7}, "unknown key(s) in r: dayly"),
])
def test_policy_errors_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(raw, "r")


def test_empty_policy_keeps_everything() -> None:
    items = backups([1, 2, 3])
    assert kept(plan(items, Policy(), NOW)) == {"b1", "b2", "b3"}


def test_max_age_counts_from_the_newest_backup() -> None:
    """Backups stopped 60 days ago: max_age 30d still keeps the last 30 days of them."""
    items = [(f"d{i}", datetime(2026, 8, 1, tzinfo=UTC) + timedelta(days=i)) for i in range(90)]
    kept_now = kept(plan(items, Policy(max_age=timedelta(days=30)), NOW + timedelta(days=60)))
    assert len(kept_now) == 30 and "d89" in kept_now and "d59" not in kept_now
