"""Secrets never leak: not in argv (see test_failures_pg), job records, events, manifests,
audit entries, API answers or logs."""

from __future__ import annotations

from shared.redact import redact, redact_url
from tests import pg

PW = pg.TEST_PASSWORD


def test_redact_urls_and_known_secrets() -> None:
    """URL passwords and known secret values are replaced in any text."""
    text = f"connect to postgresql://app:{PW}@db:5432/x failed; password was {PW}"
    out = redact(text, [PW])
    assert PW not in out and "postgresql://app:***@db" in out
    assert redact_url(f"redis://:{PW}@r:6379/0") == "redis://:***@r:6379/0"


