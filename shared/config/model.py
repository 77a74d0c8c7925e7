"""The configuration's types: what `parse_settings` builds and every part of Safehold
reads (settings are frozen; a target's secrets are `Secret`s that never print)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.retention import Policy

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

    def public(self) -> dict[str, object]:
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
    # when the daily prune runs (HH:MM in each target's zone), or "off"
    daily_prune: str = "04:00"


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
class PitrConfig:
    """`[targets.<t>.pitr]`: a PostgreSQL target's WAL archive, streamed continuously from
    a physical replication slot, with a base backup on a schedule; a MySQL/MariaDB target's
    binlog, streamed continuously, its regular backups the bases (README, "Point-in-time
    recovery")."""

    enabled: bool = False
    slot: str = ""  # the physical replication slot (default safehold_<target>)
    base_schedule: str = "0 3 * * *"  # crontab of base backups, in the target's zone
    keep_days: float = 7.0  # the recovery window kept
    ship_interval: float = 1.0  # seconds between shipments of the WAL being written
    lag_alarm_mb: int = 1024  # WAL the slot holds on the server before `pitr.lagging`
    pg_bindir: str = ""  # pg_receivewal, pg_basebackup… (default: `pg_config --bindir`)

    def public(self) -> dict[str, object]:
        return {"enabled": self.enabled, "slot": self.slot,
                "base_schedule": self.base_schedule, "keep_days": self.keep_days}


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
    pitr: PitrConfig | None = None  # point-in-time recovery (postgresql)

    @property
    def is_set(self) -> bool:
        return bool(self.databases)

    @property
    def compress(self) -> bool:
        return self.compression != "none"

    def secrets(self) -> list[str]:
        """Values to redact from anything this target's tools or drivers say."""
        return [self.password.reveal()] if self.password is not None else []

    def public(self) -> dict[str, object]:
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
            "pitr": self.pitr.public() if self.pitr is not None else None,
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
