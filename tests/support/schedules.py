"""What the schedule tests share: settings with a schedule on the test target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.config import Settings, parse_settings
from tests.conftest import make_raw_config


def with_schedule(prefix: str, tmp_path: Path, pg_db: str | None, test_env: dict[str, str],
                  **target: Any) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"].update(target)
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")
