"""Where a client command finds its server and token, and `safehold login`'s stored login.

A client needs a URL and a bearer token, nothing else: never a target's secrets. The URL is
`--url`, `$SAFEHOLD_URL`, the stored login, or the config's [server] address, in that order;
the token is `$SAFEHOLD_TOKEN`, or the stored login's when it was stored for that same URL
(a token is never sent to a server it was not given for).

The login is one JSON file, `$XDG_CONFIG_HOME/safehold/login.json` (default
`~/.config/safehold/`), written 0600 in a 0700 directory, replaced atomically.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.config import ClientSettings
from shared.errors import ConfigError


@dataclass(frozen=True)
class StoredLogin:
    url: str
    token: str


def login_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "safehold" / "login.json"


def normalize_url(url: str) -> str:
    """`url` without a trailing slash, refused unless it is http(s)://host[:port][/path]."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"--url {url!r}: give the server's base URL, like "
                          "https://backups.example.com or http://127.0.0.1:8081")
    return url.strip().rstrip("/")


def read_login(env: Mapping[str, str]) -> StoredLogin | None:
    """The stored login, or None. A file others can read, or one that is not ours, is
    refused: it holds a bearer token."""
    path = login_path(env)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror}): run `safehold logout` "
                          "or remove it") from None
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user (uid {st.st_uid}): it is not "
                          "used. Remove it, then `safehold login` again")
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o})"
                          f": it holds a token. Run `chmod 600 {path}` or `safehold logout`")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror}): run `safehold logout` "
                          "or remove it") from None
    try:
        doc = json.loads(text)
        login = StoredLogin(url=normalize_url(doc["url"]), token=str(doc["token"]))
    except (ValueError, KeyError, TypeError, ConfigError):
        raise ConfigError(f"{path} is not a Safehold login: run `safehold login` again "
                          "or remove it (`safehold logout`)") from None
    return login


def save_login(env: Mapping[str, str], login: StoredLogin) -> Path:
    path = login_path(env)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".login.")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"url": login.url, "token": login.token,
                       "saved_at": int(time.time())}, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def remove_login(env: Mapping[str, str]) -> Path | None:
    path = login_path(env)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def server_url(arg_url: str | None, env: Mapping[str, str], settings: ClientSettings,
               login: StoredLogin | None) -> str:
    if arg_url:
        return normalize_url(arg_url)
    if env.get("SAFEHOLD_URL"):
        return normalize_url(env["SAFEHOLD_URL"])
    if login is not None:
        return login.url
    return f"http://{settings.server.host}:{settings.server.port}"


def bearer_token(url: str, env: Mapping[str, str], login: StoredLogin | None,
                 url_from_login: bool = False) -> str | None:
    """The token for `url`: the stored login's when the URL is the login's own choice
    (so $SAFEHOLD_TOKEN, meant for another server, never goes there), else
    $SAFEHOLD_TOKEN, else the stored login's when it was stored for this very URL."""
    if url_from_login and login is not None:
        return login.token
    if env.get("SAFEHOLD_TOKEN"):
        return env["SAFEHOLD_TOKEN"]
    if login is not None and login.url == url:
        return login.token
    return None


def token_expiry(token: str) -> float | None:
    """The `exp` a JWT says it has (unverified: only to tell the person when to log in
    again; the server verifies the token)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (IndexError, ValueError, AttributeError):
        return None


def plain_http_elsewhere(url: str) -> bool:
    """True when the URL sends a token in clear text to another machine."""
    parts = urlsplit(url)
    return parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1")
