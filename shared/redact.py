"""Keep secrets out of messages: redact URL passwords and known secret values."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

_URL_PW = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]+)@")


def redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove passwords in URLs and every known secret value from `text`."""
    text = _URL_PW.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    for s in secrets:
        if s and len(s) >= 3:
            text = text.replace(s, "***")
    return text
