"""Configuration: `safehold.toml` plus `SAFEHOLD_*` environment overrides, validated once.

Built at the edge (`load_settings(path, os.environ)`) and passed down explicitly; nothing
here reads the environment at import time. Every error names the key at fault.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from shared.config.model import (
    _SECTIONS,
    TARGET_ID_RE,
    AuthSettings,
    DestinationConfig,
    EncryptionConfig,
    LimitSettings,
    NotificationSettings,
    PitrConfig,
    RedisSettings,
    Secret,
    ServerSettings,
    Settings,
    StorageSettings,
    TargetConfig,
    WorkerSettings,
)
from shared.config.targets import cast_value, parse_target
from shared.errors import ConfigError
from shared.retention import parse_policy

DEFAULT_TOML = """
default_target = "example"

[targets.example]
engine = "sqlite"
path = "./data/example.db"
"""


EXAMPLE_SQL = Path(__file__).resolve().parent.parent / "example.sql"


def ensure_example_database(settings: Settings) -> Path | None:
    """With the built-in config, create the bundled example SQLite database if missing."""
    if settings.source != "<built-in default>":
        return None
    import sqlite3

    path = Path(settings.targets["example"].path)
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(EXAMPLE_SQL.read_text())
    finally:
        conn.close()
    return path


def _section(name: str, cls: type, raw: object, env: Mapping[str, str]) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section [{name}] must be a table")
    defaults = cls()
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(
            f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(known))})"
        )
    values = {}
    for f in fields(cls):
        env_name = f"SAFEHOLD_{name.upper()}_{f.name.upper()}"
        if env_name in env:
            values[f.name] = cast_value(env_name, env[env_name], getattr(defaults, f.name))
        elif f.name in raw:
            values[f.name] = cast_value(f"{name}.{f.name}", raw[f.name], getattr(defaults, f.name))
    return replace(defaults, **values)


def _notifications(raw: object, n: NotificationSettings, env: Mapping[str, str],
                   base: Path) -> NotificationSettings:
    for key in ("apprise_urls", "webhook_secret"):
        if isinstance(raw, Mapping) and key in raw:
            raise ConfigError(f"notifications.{key} may not be written in the config file "
                              f"(it carries credentials): use {key}_env")
    if n.min_severity not in ("info", "warning", "error"):
        raise ConfigError("notifications.min_severity must be info, warning or error")
    if n.webhook_url and not n.webhook_url.startswith(("http://", "https://")):
        raise ConfigError("notifications.webhook_url must be an http(s) URL")
    values: dict[str, Any] = {
        k: Secret(v) for k in ("apprise_urls", "webhook_secret")  # from SAFEHOLD_* overrides
        if isinstance(v := getattr(n, k), str)}
    for key, secret in (("apprise_urls_env", "apprise_urls"),
                        ("webhook_secret_env", "webhook_secret")):
        name = getattr(n, key)
        if name:
            if name not in env:
                raise ConfigError(f"notifications.{key}: environment variable {name} is not "
                                  "set")
            values[secret] = Secret(env[name])
    if n.apprise_urls_file and not Path(n.apprise_urls_file).is_absolute():
        values["apprise_urls_file"] = str(base / n.apprise_urls_file)
    return replace(n, **values)


_DEST_KEYS = {f.name for f in fields(DestinationConfig)} - {"name", "access_key", "secret_key"}


def _destinations(raw: Mapping[str, object], env: Mapping[str, str], base: Path
                  ) -> dict[str, DestinationConfig]:
    out = {}
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            continue
        if not TARGET_ID_RE.match(name):
            raise ConfigError(f"destination name '{name}' must be 1-63 characters of a-z, "
                              "0-9, '_' or '-'")
        for key in ("access_key_id", "secret_access_key", "aws_access_key_id",
                    "aws_secret_access_key", "password"):
            if key in table:
                raise ConfigError(f"[storage.{name}]: credentials may not be written in the "
                                  "config file; use access_key_id_env/secret_access_key_env "
                                  "or credentials_file")
        unknown = set(table) - _DEST_KEYS
        if unknown:
            raise ConfigError(f"unknown key(s) in [storage.{name}]: "
                              f"{', '.join(sorted(unknown))} (known: "
                              f"{', '.join(sorted(_DEST_KEYS))})")
        defaults = DestinationConfig(name)
        values: dict[str, Any] = {k: cast_value(f"storage.{name}.{k}", v, getattr(defaults, k))
                                  for k, v in table.items() if k != "retention"}
        if "retention" in table:
            if not isinstance(table["retention"], Mapping):
                raise ConfigError(f"[storage.{name}.retention] must be a table")
            values["retention"] = parse_policy(table["retention"],
                                               f"storage.{name}.retention")
        d = replace(defaults, **values)
        if d.type == "local":
            if not d.path:
                raise ConfigError(f"[storage.{name}] (type local) needs path")
            p = Path(d.path)
            d = replace(d, path=str((p if p.is_absolute() else base / p).resolve()))
        elif d.type == "s3":
            d = _s3_destination(d, env, base)
        else:
            raise ConfigError(f"storage.{name}.type must be \"local\" or \"s3\", "
                              f"got {d.type!r}")
        out[name] = d
    return out


def _s3_destination(d: DestinationConfig, env: Mapping[str, str], base: Path
                    ) -> DestinationConfig:
    where = f"[storage.{d.name}]"
    if not d.bucket:
        raise ConfigError(f"{where} (type s3) needs bucket")
    if d.sse not in ("", "AES256", "aws:kms"):
        raise ConfigError(f"{where} sse must be \"AES256\" or \"aws:kms\", got {d.sse!r}")
    if d.object_lock_mode not in ("", "GOVERNANCE", "COMPLIANCE"):
        raise ConfigError(f"{where} object_lock_mode must be GOVERNANCE or COMPLIANCE")
    if d.object_lock_mode and d.object_lock_days <= 0:
        raise ConfigError(f"{where} object_lock_days must be at least 1")
    if d.download not in ("stream", "redirect"):
        raise ConfigError(f"{where} download must be \"stream\" or \"redirect\"")
    if not 1 <= d.max_concurrency <= 16:
        raise ConfigError(f"{where} max_concurrency must be 1-16")
    prefix = d.prefix.strip("/")
    if d.credentials_file:
        import configparser

        p = Path(d.credentials_file)
        p = p if p.is_absolute() else base / p
        cp = configparser.ConfigParser()
        try:
            with open(p) as f:
                cp.read_file(f)
            sect = cp[d.profile]
            ak, sk = sect["aws_access_key_id"], sect["aws_secret_access_key"]
        except OSError as exc:
            raise ConfigError(f"{where} cannot read credentials_file {p}: "
                              f"{exc.strerror}") from None
        except (KeyError, configparser.Error):
            raise ConfigError(f"{where} credentials_file {p} has no [{d.profile}] with "
                              "aws_access_key_id and aws_secret_access_key") from None
    else:
        missing = [n for n in (d.access_key_id_env, d.secret_access_key_env) if n not in env]
        if missing:
            raise ConfigError(f"{where} environment variable(s) {', '.join(missing)} not set "
                              "(the S3 credentials; or set credentials_file)")
        ak, sk = env[d.access_key_id_env], env[d.secret_access_key_env]
    return replace(d, prefix=prefix, access_key=Secret(ak), secret_key=Secret(sk))


def parse_settings(
    raw: Mapping[str, object], env: Mapping[str, str], *, base: Path, source: str
) -> Settings:
    """Validate a parsed TOML document plus environment overrides into Settings."""
    allowed = {"default_target", "targets", *_SECTIONS}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    raw_storage = raw.get("storage", {})
    if not isinstance(raw_storage, Mapping):
        raise ConfigError("config section [storage] must be a table")
    flat = {**raw, "storage": {k: v for k, v in raw_storage.items()
                               if not isinstance(v, Mapping)}}
    sections = {n: _section(n, cls, flat.get(n, {}), env) for n, cls in _SECTIONS.items()}
    raw_targets = raw.get("targets", {})
    if not isinstance(raw_targets, Mapping) or not raw_targets:
        raise ConfigError("no targets configured: add at least one [targets.<id>] table")
    targets = {tid: parse_target(tid, t, env, base) for tid, t in raw_targets.items()}
    default = env.get("SAFEHOLD_DEFAULT_TARGET", raw.get("default_target", ""))
    if not isinstance(default, str):
        raise ConfigError("default_target must be a string (a target id)")
    if not default:
        default = next(iter(targets))
    if default not in targets:
        raise ConfigError(f"default_target '{default}' is not a configured target")
    worker = sections["worker"]
    if not re.fullmatch(r"off|([01][0-9]|2[0-3]):[0-5][0-9]", worker.daily_prune):
        raise ConfigError("worker.daily_prune must be a time HH:MM (in each target's "
                          f"timezone) or \"off\"; got {worker.daily_prune!r}")
    if not 0 < worker.poll_delay <= 60:
        raise ConfigError("worker.poll_delay must be more than 0 and at most 60 seconds "
                          "(a queued job wakes an idle worker at once anyway)")
    auth = sections["auth"]
    if auth.issuer and not (auth.audiences() or auth.azps()):
        raise ConfigError("[auth] issuer is set: also set audience and/or allowed_azp, so "
                          "tokens minted for other clients of the same realm are refused")
    if not Path(auth.dev_key_path).is_absolute():
        sections["auth"] = replace(auth, dev_key_path=str(base / auth.dev_key_path))
    storage = sections["storage"]
    if not Path(storage.path).is_absolute():
        sections["storage"] = replace(storage, path=str((base / storage.path).resolve()))
    sections["notifications"] = _notifications(raw.get("notifications", {}),
                                               sections["notifications"], env, base)
    destinations = _destinations(raw_storage, env, base)
    known_dest = {"local", *destinations}
    for t in targets.values():
        unknown_dest = [d for d in t.destinations if d not in known_dest]
        if unknown_dest:
            raise ConfigError(f"target '{t.id}': unknown destination(s) "
                              f"{', '.join(unknown_dest)} (declared: "
                              f"{', '.join(sorted(known_dest))})")
    for where, mode in [("storage.file_mode", sections["storage"].file_mode)] + [
            (f"storage.{d.name}.file_mode", d.file_mode) for d in destinations.values()]:
        if not re.fullmatch(r"0?[0-7]{3}", mode) or int(mode, 8) & 0o111:
            raise ConfigError(f"{where} must be an octal file mode without execute bits, "
                              f"like 0600 or 0640; got {mode!r}")
    order = [n.strip() for n in sections["storage"].read_order.split(",") if n.strip()]
    if bad := [n for n in order if n not in known_dest]:
        raise ConfigError(f"storage.read_order names unknown destination(s) {', '.join(bad)}")
    return Settings(targets=targets, default_target=default, source=source,
                    destinations=destinations,
                    warnings=_unknown_env(env, raw_targets, raw_storage, raw), **sections)


# SAFEHOLD_* variables that are not config overrides


_OWN_VARIABLES = {"SAFEHOLD_CONFIG", "SAFEHOLD_DEFAULT_TARGET", "SAFEHOLD_TOKEN",
                  "SAFEHOLD_URL", "SAFEHOLD_LOG_LEVEL", "SAFEHOLD_LOG_FORMAT"}


def _unknown_env(env: Mapping[str, str], raw_targets: object, raw_storage: object,
                 raw: Mapping[str, object]) -> tuple[str, ...]:
    """SAFEHOLD_* variables that nothing reads: most likely a misspelled override."""
    import difflib

    known = set(_OWN_VARIABLES)
    for section, cls in _SECTIONS.items():
        known |= {f"SAFEHOLD_{section.upper()}_{f.name.upper()}" for f in fields(cls)}
    referenced: set[str] = set()

    def collect(node: object) -> None:  # variables the config names (password_env, …_env)
        if isinstance(node, Mapping):
            for k, v in node.items():
                if isinstance(k, str) and k.endswith("_env") and isinstance(v, str):
                    referenced.add(v)
                collect(v)

    collect({"t": raw_targets, "s": raw_storage, "n": raw.get("notifications", {})})
    out = []
    for name in sorted(env):
        if not name.startswith("SAFEHOLD_") or name in known or name in referenced:
            continue
        if name.startswith("SAFEHOLD_TEST_"):
            continue  # the test suite's own
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        out.append(f"environment variable {name} is not a Safehold setting and is ignored"
                   + (f" (did you mean {close[0]}?)" if close else ""))
    return tuple(out)


def _read_config(path: str | os.PathLike[str] | None, env: Mapping[str, str]
                 ) -> tuple[Mapping[str, object], Path, str]:
    """The TOML document named by `path`, `SAFEHOLD_CONFIG` or ./safehold.toml (else the
    built-in default), the directory relative paths start from, and where it came from."""
    chosen = path or env.get("SAFEHOLD_CONFIG")
    if chosen is None and Path("safehold.toml").exists():
        chosen = "safehold.toml"
    if chosen is None:
        return tomllib.loads(DEFAULT_TOML), Path.cwd(), "<built-in default>"
    p = Path(chosen)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return raw, p.resolve().parent, str(p)


def load_settings(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Settings:
    """Load the config named by `path`, `SAFEHOLD_CONFIG`, or ./safehold.toml, else defaults."""
    raw, base, source = _read_config(path, env)
    return parse_settings(raw, env, base=base, source=source)


@dataclass(frozen=True)
class ClientSettings:
    """What a client command reads of the config: where the server listens and how dev
    tokens are signed. No target, no secret: a client needs a URL and a token only."""

    server: ServerSettings
    auth: AuthSettings
    source: str


def load_client_settings(path: str | os.PathLike[str] | None, env: Mapping[str, str]
                         ) -> ClientSettings:
    """The [server] and [auth] sections of the config `load_settings` would read (with
    their SAFEHOLD_* overrides); targets, storage and their credentials are not resolved."""
    raw, base, source = _read_config(path, env)
    server = _section("server", ServerSettings, raw.get("server", {}), env)
    auth = _section("auth", AuthSettings, raw.get("auth", {}), env)
    if not Path(auth.dev_key_path).is_absolute():
        auth = replace(auth, dev_key_path=str(base / auth.dev_key_path))
    return ClientSettings(server=server, auth=auth, source=source)


__all__ = [
    "TARGET_ID_RE",
    "AuthSettings",
    "DestinationConfig",
    "EncryptionConfig",
    "LimitSettings",
    "NotificationSettings",
    "PitrConfig",
    "RedisSettings",
    "Secret",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "TargetConfig",
    "WorkerSettings",
    "ClientSettings",
    "DEFAULT_TOML",
    "ensure_example_database",
    "load_client_settings",
    "load_settings",
    "parse_settings",
]
