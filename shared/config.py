"""Configuration: `safehold.toml` plus `SAFEHOLD_*` environment overrides, validated once.

Built at the edge (`load_settings(path, os.environ)`) and passed down explicitly; nothing
here reads the environment at import time. Every error names the key at fault.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared import schedules
from shared.errors import ConfigError
from shared.naming import ENGINE_EXTENSIONS
from shared.retention import Policy, parse_policy

TARGET_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")


class Secret:
    """A string that never shows itself in repr/str (logs, tracebacks, job records)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8081
    wait_timeout: float = 300.0  # how long the seed surface waits for a job
    sse_ping_interval: float = 15.0
    max_upload_bytes: int = 20 * 1024**3  # uploads beyond this get 413
    # the address people use (behind a TLS-terminating proxy): the SSO redirect URI
    public_url: str = ""


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "safehold"  # namespace of every key, stream and the arq queue


@dataclass(frozen=True)
class StorageSettings:
    """`path` is the built-in destination `local`; more are `[storage.<name>]` tables."""

    path: str = "./backups"
    read_order: str = ""  # comma-separated destination names tried first by restores/downloads
    file_mode: str = "0600"  # backups and manifests on local destinations (directories 0700)


@dataclass(frozen=True)
class DestinationConfig:
    """One place backups are stored: a local directory or an S3-compatible bucket.
    Credentials come from the environment or a file, never from the TOML."""

    name: str
    type: str = "local"  # "local" | "s3"
    path: str = ""  # local
    endpoint: str = ""  # s3: e.g. https://s3.eu-west-1.amazonaws.com or http://minio:9000
    region: str = "us-east-1"
    bucket: str = ""
    prefix: str = ""
    path_style: bool = True
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    credentials_file: str = ""  # AWS shared-credentials format ([profile] aws_access_key_id…)
    profile: str = "default"
    sse: str = ""  # "" | "AES256" | "aws:kms"
    sse_kms_key_id: str = ""
    storage_class: str = ""  # e.g. STANDARD_IA, GLACIER_IR
    object_lock_mode: str = ""  # "" | "GOVERNANCE" | "COMPLIANCE"
    object_lock_days: int = 0
    download: str = "stream"  # "stream" through the API, or "redirect" to a presigned URL
    presign_ttl: int = 300
    max_concurrency: int = 2  # parts uploading at once (memory: this × part size)
    file_mode: str = "0600"  # local: mode of backups and manifests
    retention: Policy | None = None  # overrides each target's policy on this destination
    access_key: Secret | None = field(default=None, compare=False, repr=False)
    secret_key: Secret | None = field(default=None, compare=False, repr=False)

    def public(self) -> dict[str, Any]:
        if self.type == "local":
            return {"name": self.name, "type": "local", "path": self.path}
        return {"name": self.name, "type": "s3", "endpoint": self.endpoint or None,
                "region": self.region, "bucket": self.bucket, "prefix": self.prefix,
                "sse": self.sse or None, "storage_class": self.storage_class or None,
                "object_lock": ({"mode": self.object_lock_mode, "days": self.object_lock_days}
                                if self.object_lock_mode else None),
                "download": self.download}


@dataclass(frozen=True)
class EncryptionConfig:
    """age encryption of a target's backups: public keys to encrypt to (an operations key
    plus an offline escrow key, say); the worker's identity file to decrypt for restores."""

    recipients: tuple[str, ...] = ()
    recipients_file: str = ""
    identity_file: str = ""

    def recipient_lines(self) -> list[str]:
        """Every recipient, reading `recipients_file` now: a file that cannot be read fails
        the backup (it is never written unencrypted)."""
        lines = list(self.recipients)
        if self.recipients_file:
            from shared.errors import PipelineError

            try:
                lines += Path(self.recipients_file).read_text().splitlines()
            except OSError as exc:
                raise PipelineError(f"encryption recipients_file {self.recipients_file} "
                                    f"cannot be read ({exc.strerror}); the backup was not "
                                    "written", code="encryption_unavailable") from None
        return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@dataclass(frozen=True)
class WorkerSettings:
    max_jobs: int = 4
    poll_delay: float = 0.2  # longest wait between polls (a queued job wakes a worker)
    shutdown_grace: float = 600.0  # seconds running jobs may finish after SIGTERM
    backup_timeout: float = 6 * 3600.0
    restore_timeout: float = 12 * 3600.0
    heartbeat_interval: float = 5.0
    orphan_after: float = 20.0  # a running job without heartbeat for this long is reaped
    redis_grace: float = 60.0  # a running job rides out a Redis outage this long (outage.py)
    job_ttl: float = 7 * 86400.0  # how long job records and their events are kept
    progress_interval: float = 0.5
    compress_level: int = 1  # isal level 0-3 (1: smaller than gzip -6 and fastest on SQL dumps)


@dataclass(frozen=True)
class LimitSettings:
    """Bounds on what a backup file may inflate to (uploads and restores alike)."""

    max_restore_bytes: int = 1024**4  # plain (decompressed) size of any restore or upload
    max_expansion_ratio: float = 100.0  # plain/stored ratio above which an upload is a bomb
    max_concurrent_validations: int = 2  # uploads validated at once per API process


@dataclass(frozen=True)
class NotificationSettings:
    """Where job outcomes and alerts go (see shared/notify.py). Channel URLs and the webhook
    secret carry credentials: they come from the environment or a file, never the TOML."""

    apprise_urls_env: str = ""  # name of a variable holding Apprise URLs, space-separated
    apprise_urls_file: str = ""  # or a file of them, one per line
    webhook_url: str = ""
    webhook_secret_env: str = ""  # name of the variable holding the HMAC secret
    min_severity: str = "warning"  # info | warning | error
    events: str = ""  # comma-separated event names; empty = all
    timeout: float = 10.0
    retries: int = 3
    retry_delay: float = 1.0  # doubled after each failed try
    apprise_urls: Secret | None = field(default=None, compare=False, repr=False)
    webhook_secret: Secret | None = field(default=None, compare=False, repr=False)

    @property
    def event_list(self) -> list[str]:
        return [e.strip() for e in self.events.split(",") if e.strip()]


@dataclass(frozen=True)
class AuthSettings:
    """Bearer JWT verification. With no issuer, a local dev key signs and verifies tokens."""

    issuer: str = ""
    audience: str = ""  # comma-separated; a token must name one in `aud`…
    allowed_azp: str = ""  # …or come from one of these clients (`azp`), Keycloak-style
    jwks_url: str = ""  # default: {issuer}/protocol/openid-connect/certs
    client_id: str = ""  # for resource_access.<client>.roles; default: first audience
    web_client_id: str = ""  # a public client (PKCE) for the web page's SSO login
    # origins besides the issuer's where its discovered login endpoints may be (Google's
    # token endpoint is oauth2.googleapis.com), comma-separated
    idp_endpoint_origins: str = ""
    role_claims: str = "realm_access.roles,resource_access.{client}.roles"
    role_viewer: str = "viewer"
    role_operator: str = "operator"
    role_admin: str = "admin"
    target_claim: str = ""  # optional claim (e.g. "groups") listing the targets a token may use
    leeway: float = 30.0  # seconds of clock skew allowed on exp/nbf/iat
    jwks_cooldown: float = 30.0  # at most one JWKS refresh per this many seconds
    dev_key_path: str = ".safehold/dev-jwt-key.pem"
    dev_allow_network: bool = False  # serve dev mode on a non-loopback address anyway
    public_metrics: bool = True

    @property
    def dev_mode(self) -> bool:
        return not self.issuer

    def audiences(self) -> list[str]:
        return [a.strip() for a in self.audience.split(",") if a.strip()]

    def azps(self) -> list[str]:
        return [a.strip() for a in self.allowed_azp.split(",") if a.strip()]


@dataclass(frozen=True)
class TargetConfig:
    """One database Safehold backs up. The password never comes from the TOML itself."""

    id: str
    engine: str
    url: str = ""
    path: str = ""  # sqlite
    password: Secret | None = field(default=None, compare=False)
    schedule: str = ""  # crontab (validated), in `timezone`
    timezone: str = "UTC"
    schedule_jitter: int = 0  # seconds: a fixed per-target delay spreads many targets
    catch_up: str = "latest"  # a slot missed while everything was down: run it once, or not
    missed_grace: float = 2.0  # no successful backup for this many schedule intervals: alert
    heartbeat_url: str = ""  # healthchecks.io-style pings around scheduled backups
    verify_schedule: str = ""  # crontab of restore drills of the newest backup
    verify_checks: tuple[str, ...] = ()  # SQL that must return true on the drill's copy
    notify_min_severity: str = ""  # overrides notifications.min_severity for this target
    retention: Policy = field(default_factory=Policy)
    compression: str = "gzip"  # "gzip" | "zstd" | "none"
    compression_level: int | None = None  # default: gzip 1 (isal), zstd 3
    destinations: tuple[str, ...] = ("local",)
    encryption: EncryptionConfig | None = None
    # seconds a restore waits for the application's locks (then rolls back, unchanged)
    lock_timeout: float = 60.0
    # the server's accounts travel with each backup, for a restore on a new server:
    # PostgreSQL's roles, memberships, role settings (pg_dumpall --globals-only), MySQL's
    # users and roles that hold privileges on the database, with their grants on it
    globals: bool = False
    # a server target (issue 21): every database of the server ("*",) or these, less
    # `exclude`, as one backup set; the URL's database is only where Safehold connects
    databases: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def is_set(self) -> bool:
        return bool(self.databases)

    @property
    def compress(self) -> bool:
        return self.compression != "none"

    def secrets(self) -> list[str]:
        """Values to redact from anything this target's tools or drivers say."""
        return [self.password.reveal()] if self.password is not None else []

    def public(self) -> dict[str, Any]:
        """What the API may show about this target (no secrets)."""
        return {
            "id": self.id,
            "engine": self.engine,
            "url": self.url or None,
            "path": self.path or None,
            "schedule": self.schedule or None,
            "timezone": self.timezone,
            "retention": self.retention.public(),
            "compress": self.compress,
            "compression": self.compression,
            "destinations": list(self.destinations),
            "encrypted": self.encryption is not None,
            "globals": self.globals,
            "databases": list(self.databases) or None,
        }


@dataclass(frozen=True)
class Settings:
    targets: Mapping[str, TargetConfig]
    default_target: str = ""
    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    storage: StorageSettings = StorageSettings()
    worker: WorkerSettings = WorkerSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    notifications: NotificationSettings = NotificationSettings()
    destinations: Mapping[str, DestinationConfig] = field(default_factory=dict)
    source: str = "<defaults>"
    warnings: tuple[str, ...] = ()  # said at start-up (e.g. a misspelled SAFEHOLD_* variable)

    def retains(self, target: TargetConfig) -> bool:
        """Whether prune has anything to apply: the target's policy or a destination's."""
        configs = self.destination_configs()
        return not target.retention.empty or any(
            configs[d].retention is not None for d in target.destinations if d in configs)

    def destination_configs(self) -> dict[str, DestinationConfig]:
        """Every destination, `local` (storage.path) included unless redefined."""
        out = {"local": DestinationConfig("local", "local", self.storage.path,
                                          file_mode=self.storage.file_mode)}
        out.update(self.destinations)
        return out

    def target(self, target_id: str) -> TargetConfig:
        from shared.errors import NotFound

        try:
            return self.targets[target_id]
        except KeyError:
            known = ", ".join(sorted(self.targets)) or "none"
            raise NotFound(f"unknown target '{target_id}' (configured: {known})",
                           code="target_not_found") from None


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "storage": StorageSettings,
    "worker": WorkerSettings,
    "auth": AuthSettings,
    "limits": LimitSettings,
    "notifications": NotificationSettings,
}

DEFAULT_TOML = """
default_target = "example"

[targets.example]
engine = "sqlite"
path = "./data/example.db"
"""
EXAMPLE_SQL = Path(__file__).with_name("example.sql")


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


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _cast(name: str, value: Any, template: Any) -> Any:
    try:
        if isinstance(template, bool):
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(template, int):
            return int(value)
        if isinstance(template, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config '{name}' must be {_KIND_NAMES.get(type(template), 'a string')}, "
            f"got {value!r}"
        ) from None


def _section(name: str, cls: type, raw: Mapping[str, Any], env: Mapping[str, str]) -> Any:
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
            values[f.name] = _cast(env_name, env[env_name], getattr(defaults, f.name))
        elif f.name in raw:
            values[f.name] = _cast(f"{name}.{f.name}", raw[f.name], getattr(defaults, f.name))
    return replace(defaults, **values)


def _password(
    tid: str, raw: Mapping[str, Any], env: Mapping[str, str], base: Path
) -> Secret | None:
    if "password" in raw:
        raise ConfigError(
            f"target '{tid}': a password may not be written in the config file; "
            "use password_env (name of an environment variable) or password_file"
        )
    if raw.get("password_env") and raw.get("password_file"):
        raise ConfigError(f"target '{tid}': set password_env or password_file, not both")
    if name := raw.get("password_env"):
        if name not in env:
            raise ConfigError(
                f"target '{tid}': environment variable {name} (password_env) is not set"
            )
        return Secret(env[name])
    if pfile := raw.get("password_file"):
        p = Path(pfile) if Path(pfile).is_absolute() else base / pfile
        try:
            return Secret(p.read_text().rstrip("\r\n"))
        except OSError as exc:
            raise ConfigError(
                f"target '{tid}': cannot read password_file {p}: {exc.strerror}"
            ) from None
    return None


def _target(tid: str, raw: Any, env: Mapping[str, str], base: Path) -> TargetConfig:
    if not TARGET_ID_RE.match(tid):
        raise ConfigError(
            f"target id '{tid}' must be 1-63 characters of a-z, 0-9, '_' or '-'"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[targets.{tid}] must be a table")
    known = {"engine", "url", "path", "password_env", "password_file", "schedule",
             "timezone", "schedule_jitter", "catch_up", "missed_grace", "heartbeat_url",
             "verify_schedule", "verify_checks", "notify_min_severity",
             "retention", "compress", "compression", "compression_level", "destinations",
             "encryption", "lock_timeout", "globals", "databases", "exclude"}
    unknown = set(raw) - known - {"password"}
    if unknown:
        raise ConfigError(f"unknown key(s) in [targets.{tid}]: {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    engine = raw.get("engine")
    if engine not in ENGINE_EXTENSIONS:
        raise ConfigError(
            f"target '{tid}': unknown engine {engine!r} "
            f"(one of: {', '.join(sorted(ENGINE_EXTENSIONS))})"
        )
    url = str(raw.get("url", ""))
    path = str(raw.get("path", ""))
    if engine == "sqlite":
        if not path:
            raise ConfigError(f"target '{tid}': a sqlite target needs path")
        if not Path(path).is_absolute():
            path = str(base / path)
    else:
        if not url:
            raise ConfigError(f"target '{tid}': engine {engine} needs url")
        parts = urlsplit(url)
        if parts.password:
            raise ConfigError(
                f"target '{tid}': the url contains a password; remove it and use "
                "password_env or password_file"
            )
        if not parts.scheme or not parts.hostname:
            raise ConfigError(f"target '{tid}': url must look like scheme://user@host:port/db")
    retention = raw.get("retention", {})
    if not isinstance(retention, Mapping):
        raise ConfigError(f"[targets.{tid}.retention] must be a table")
    policy = parse_policy(retention, f"targets.{tid}.retention")
    tz = str(raw.get("timezone", "UTC"))
    schedules.zone(tz, f"targets.{tid}.timezone")
    schedule = str(raw.get("schedule", ""))
    if schedule:
        schedules.validate(schedule, f"targets.{tid}.schedule")
    catch_up = str(raw.get("catch_up", "latest"))
    if catch_up not in ("latest", "none"):
        raise ConfigError(f"targets.{tid}.catch_up must be \"latest\" or \"none\"")
    jitter = _cast(f"targets.{tid}.schedule_jitter", raw.get("schedule_jitter", 0), 0)
    if not 0 <= jitter <= 86400:
        raise ConfigError(f"targets.{tid}.schedule_jitter must be 0-86400 seconds")
    lock_timeout = _cast(f"targets.{tid}.lock_timeout", raw.get("lock_timeout", 60.0), 60.0)
    if not 0.1 <= lock_timeout <= 86400:
        raise ConfigError(f"targets.{tid}.lock_timeout must be 0.1-86400 seconds")
    with_globals = raw.get("globals", False)
    if not isinstance(with_globals, bool):
        raise ConfigError(f"targets.{tid}.globals must be true or false")
    if with_globals and engine not in ("postgresql", "mysql"):
        raise ConfigError(f"targets.{tid}.globals applies to PostgreSQL (roles, memberships, "
                          "role settings) and MySQL/MariaDB targets (the accounts and grants "
                          f"of the database), not to {engine}")
    databases, exclude = _server_set(tid, engine, raw)
    if databases:
        if raw.get("globals") is False:
            raise ConfigError(f"targets.{tid}: a server target (databases) always carries "
                              "the server's globals; remove globals = false")
        with_globals = True
    return TargetConfig(
        id=tid,
        engine=engine,
        url=url,
        path=path,
        password=_password(tid, raw, env, base),
        schedule=schedule,
        timezone=tz,
        schedule_jitter=jitter,
        catch_up=catch_up,
        missed_grace=_cast(f"targets.{tid}.missed_grace", raw.get("missed_grace", 2.0), 2.0),
        heartbeat_url=_http_url(tid, "heartbeat_url", raw),
        verify_schedule=_verify_schedule(tid, raw),
        verify_checks=_verify_checks(tid, raw),
        notify_min_severity=_severity(tid, raw),
        retention=policy,
        compression=_compression(tid, raw),
        compression_level=_level(tid, raw),
        destinations=_destination_names(tid, raw),
        encryption=_encryption(tid, raw.get("encryption"), base),
        lock_timeout=lock_timeout,
        globals=with_globals,
        databases=databases,
        exclude=exclude,
    )


def _server_set(tid: str, engine: str, raw: Mapping[str, Any]
                ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`databases = "*"` or a list of names, and `exclude = [...]`."""
    wanted, exclude = raw.get("databases"), raw.get("exclude", [])
    if wanted is None:
        if "exclude" in raw:
            raise ConfigError(f"targets.{tid}.exclude goes with databases = \"*\"")
        return (), ()
    if engine not in ("postgresql", "mysql"):
        raise ConfigError(f"targets.{tid}.databases: server targets are PostgreSQL and "
                          f"MySQL/MariaDB targets (a MongoDB target names its databases in "
                          f"its URL), not {engine}")

    def names(value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(
                isinstance(v, str) and 0 < len(v) <= 255 and "\0" not in v for v in value):
            raise ConfigError(f"targets.{tid}.{key} must be a list of database names")
        if len(set(value)) != len(value):
            raise ConfigError(f"targets.{tid}.{key} names a database twice")
        return tuple(value)
    if wanted == "*":
        found: tuple[str, ...] = ("*",)
    else:
        found = names(wanted, "databases")
        if not found:
            raise ConfigError(f"targets.{tid}.databases is empty (\"*\" for every database)")
    return found, names(exclude, "exclude")


def _notifications(raw: Any, n: NotificationSettings, env: Mapping[str, str],
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


def _http_url(tid: str, key: str, raw: Mapping[str, Any]) -> str:
    value = str(raw.get(key, ""))
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(f"targets.{tid}.{key} must be an http(s) URL")
    return value


def _severity(tid: str, raw: Mapping[str, Any]) -> str:
    value = str(raw.get("notify_min_severity", ""))
    if value not in ("", "info", "warning", "error"):
        raise ConfigError(f"targets.{tid}.notify_min_severity must be info, warning or error")
    return value


def _verify_schedule(tid: str, raw: Mapping[str, Any]) -> str:
    expr = str(raw.get("verify_schedule", ""))
    if expr:
        schedules.validate(expr, f"targets.{tid}.verify_schedule")
    return expr


def _verify_checks(tid: str, raw: Mapping[str, Any]) -> tuple[str, ...]:
    checks = raw.get("verify_checks", [])
    if checks and raw.get("engine") not in ("postgresql", "mysql", "sqlite"):
        raise ConfigError(f"targets.{tid}.verify_checks are SQL queries: only postgresql, "
                          "mysql and sqlite targets take them (drills of the other engines "
                          "compare keys, documents or entities)")
    if not isinstance(checks, list) or not all(isinstance(c, str) and c.strip()
                                               for c in checks):
        raise ConfigError(f"targets.{tid}.verify_checks must be a list of SQL queries that "
                          "return true, e.g. [\"SELECT count(*) > 0 FROM orders\"]")
    return tuple(checks)


COMPRESSIONS = ("gzip", "zstd", "none")


def _compression(tid: str, raw: Mapping[str, Any]) -> str:
    if "compression" in raw:
        value = raw["compression"]
        if value not in COMPRESSIONS:
            raise ConfigError(f"targets.{tid}.compression must be one of "
                              f"{', '.join(COMPRESSIONS)}, got {value!r}")
        return str(value)
    return "gzip" if _cast(f"targets.{tid}.compress", raw.get("compress", True), True) \
        else "none"


def _level(tid: str, raw: Mapping[str, Any]) -> int | None:
    if "compression_level" not in raw:
        return None
    level = _cast(f"targets.{tid}.compression_level", raw["compression_level"], 0)
    if not 0 <= level <= 19:
        raise ConfigError(f"targets.{tid}.compression_level must be 0-19 (gzip uses 0-3)")
    return int(level)


def _destination_names(tid: str, raw: Mapping[str, Any]) -> tuple[str, ...]:
    value = raw.get("destinations", ["local"])
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"targets.{tid}.destinations must be a non-empty list of "
                          "destination names, e.g. [\"local\", \"offsite\"]")
    if len(set(value)) != len(value):
        raise ConfigError(f"targets.{tid}.destinations names a destination twice")
    return tuple(value)


def _encryption(tid: str, raw: Any, base: Path) -> EncryptionConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[targets.{tid}.encryption] must be a table")
    unknown = set(raw) - {"recipients", "recipients_file", "identity_file"}
    if unknown:
        raise ConfigError(f"unknown key(s) in [targets.{tid}.encryption]: "
                          f"{', '.join(sorted(unknown))} (known: identity_file, recipients, "
                          "recipients_file)")
    recipients = raw.get("recipients", [])
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise ConfigError(f"targets.{tid}.encryption.recipients must be a list of age "
                          "public keys (age1…) or SSH public keys")
    if not recipients and not raw.get("recipients_file"):
        raise ConfigError(f"targets.{tid}.encryption needs recipients or recipients_file")

    def path(key: str) -> str:
        value = str(raw.get(key, ""))
        return str(base / value) if value and not Path(value).is_absolute() else value

    return EncryptionConfig(tuple(recipients), path("recipients_file"), path("identity_file"))


_DEST_KEYS = {f.name for f in fields(DestinationConfig)} - {"name", "access_key", "secret_key"}


def _destinations(raw: Mapping[str, Any], env: Mapping[str, str], base: Path
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
        values: dict[str, Any] = {k: _cast(f"storage.{name}.{k}", v, getattr(defaults, k))
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
    raw: Mapping[str, Any], env: Mapping[str, str], *, base: Path, source: str
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
    targets = {tid: _target(tid, t, env, base) for tid, t in raw_targets.items()}
    default = env.get("SAFEHOLD_DEFAULT_TARGET", raw.get("default_target", ""))
    if not default:
        default = next(iter(targets))
    if default not in targets:
        raise ConfigError(f"default_target '{default}' is not a configured target")
    worker = sections["worker"]
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


def _unknown_env(env: Mapping[str, str], raw_targets: Any, raw_storage: Any,
                 raw: Mapping[str, Any]) -> tuple[str, ...]:
    """SAFEHOLD_* variables that nothing reads: most likely a misspelled override."""
    import difflib

    known = set(_OWN_VARIABLES)
    for section, cls in _SECTIONS.items():
        known |= {f"SAFEHOLD_{section.upper()}_{f.name.upper()}" for f in fields(cls)}
    referenced: set[str] = set()

    def collect(node: Any) -> None:  # variables the config names (password_env, …_env)
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
                 ) -> tuple[Mapping[str, Any], Path, str]:
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
