"""Bearer-token verification against a forged issuer (real RSA keys, a real JWKS server),
the role matrix over the whole route table, and dev mode."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.routes import ROUTES
from shared.errors import ConfigError


def test_every_path_parameter_is_probed() -> None:
    """The matrix fills every path parameter the table uses (a new one must be added)."""
    params = {p for r in ROUTES for p in re.findall(r"{(\w+)}", r.path)}
    assert params <= {"target", "file", "job_id", "filename", "table"}


def test_issuer_without_audience_is_a_config_error(tmp_path: Path) -> None:
    """An issuer alone would accept tokens of every client of the realm: refused."""
    from shared.config import parse_settings

    raw = {"auth": {"issuer": "https://sso/realms/x"},
           "targets": {"s": {"engine": "sqlite", "path": "x.db"}}}
    with pytest.raises(ConfigError, match="audience"):
        parse_settings(raw, {}, base=tmp_path, source="<t>")


