"""One `[targets.<id>]` table read and checked: engine, URL, password (never in the file),
schedules, retention, compression, encryption, destinations, a server set's members.
Every error names the target and the key at fault."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared import schedules
from shared.config.model import (
    TARGET_ID_RE,
    EncryptionConfig,
    PitrConfig,
    Secret,
    TargetConfig,
)
from shared.errors import ConfigError
from shared.naming import ENGINE_EXTENSIONS
from shared.retention import parse_policy

_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def cast_value(name: str, value: Any, template: Any) -> Any:
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


def password(
    tid: str, raw: Mapping[str, object], env: Mapping[str, str], base: Path
) -> Secret | None:
    if "password" in raw:
        raise ConfigError(
            f"target '{tid}': a password may not be written in the config file; "
            "use password_env (name of an environment variable) or password_file"
        )
    if raw.get("password_env") and raw.get("password_file"):
        raise ConfigError(f"target '{tid}': set password_env or password_file, not both")
    for key in ("password_env", "password_file"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"targets.{tid}.{key} must be a string")
    if (name := raw.get("password_env")) and isinstance(name, str):
        if name not in env:
            raise ConfigError(
                f"target '{tid}': environment variable {name} (password_env) is not set"
            )
        return Secret(env[name])
    if (pfile := raw.get("password_file")) and isinstance(pfile, str):
        p = Path(pfile) if Path(pfile).is_absolute() else base / pfile
        try:
            return Secret(p.read_text().rstrip("\r\n"))
        except OSError as exc:
            raise ConfigError(
                f"target '{tid}': cannot read password_file {p}: {exc.strerror}"
            ) from None
    return None


def parse_target(tid: str, raw: object, env: Mapping[str, str], base: Path) -> TargetConfig:
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
             "encryption", "lock_timeout", "globals", "databases", "exclude", "pitr"}
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
    url, path = _where(tid, engine, raw, base)
    retention = raw.get("retention", {})
    if not isinstance(retention, Mapping):
        raise ConfigError(f"[targets.{tid}.retention] must be a table")
    policy = parse_policy(retention, f"targets.{tid}.retention")
    tz, schedule, catch_up, jitter = _schedule(tid, raw)
    lock_timeout = cast_value(f"targets.{tid}.lock_timeout", raw.get("lock_timeout", 60.0), 60.0)
    if not 0.1 <= lock_timeout <= 86400:
        raise ConfigError(f"targets.{tid}.lock_timeout must be 0.1-86400 seconds")
    with_globals, databases, exclude = _globals(tid, engine, raw)
    return TargetConfig(
        id=tid,
        engine=engine,
        url=url,
        path=path,
        password=password(tid, raw, env, base),
        schedule=schedule,
        timezone=tz,
        schedule_jitter=jitter,
        catch_up=catch_up,
        missed_grace=cast_value(f"targets.{tid}.missed_grace", raw.get("missed_grace", 2.0), 2.0),
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
        pitr=_pitr(tid, engine, raw.get("pitr")),
    )


_SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}\Z")
PITR_KEYS = ("enabled", "slot", "base_schedule", "keep_days", "ship_interval",
             "lag_alarm_mb", "pg_bindir")


def _pitr(tid: str, engine: str, raw: object) -> PitrConfig | None:
    """The target's `pitr` table, checked; None when it has none."""
    if raw is None:
        return None
    where = f"targets.{tid}.pitr"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    unknown = set(raw) - set(PITR_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(PITR_KEYS)})")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled must be true or false")
    if engine not in ("postgresql", "mysql"):
        raise ConfigError(f"[{where}]: point-in-time recovery is built for postgresql and "
                          f"mysql targets (target '{tid}' is {engine})")
    if engine == "mysql" and (pg_only := sorted({"slot", "base_schedule", "pg_bindir"}
                                                 & set(raw))):
        raise ConfigError(f"[{where}]: {', '.join(pg_only)} belong to PostgreSQL's archive; a "
                          "MySQL/MariaDB target's bases are its regular backups (its "
                          "schedule), its archive is the server's binlog")
    slot = raw.get("slot", "safehold_" + tid.replace("-", "_"))
    if not isinstance(slot, str) or not _SLOT_RE.match(slot):
        raise ConfigError(f"{where}.slot must be 1-63 characters of a-z, 0-9 and '_' (a "
                          "replication slot's name)")
    base_schedule = raw.get("base_schedule", PitrConfig.base_schedule)
    if not isinstance(base_schedule, str):
        raise ConfigError(f"{where}.base_schedule must be a crontab line")
    schedules.validate(base_schedule, f"{where}.base_schedule")
    keep_days = cast_value(f"{where}.keep_days", raw.get("keep_days", 7.0), 7.0)
    if not 0.01 <= keep_days <= 3650:
        raise ConfigError(f"{where}.keep_days must be 0.01-3650 days")
    interval = cast_value(f"{where}.ship_interval", raw.get("ship_interval", 1.0), 1.0)
    if not 0.2 <= interval <= 60:
        raise ConfigError(f"{where}.ship_interval must be 0.2-60 seconds")
    alarm = cast_value(f"{where}.lag_alarm_mb", raw.get("lag_alarm_mb", 1024), 1024)
    if not 16 <= alarm <= 10_000_000:
        raise ConfigError(f"{where}.lag_alarm_mb must be 16-10000000 (MiB of WAL)")
    bindir = raw.get("pg_bindir", "")
    if not isinstance(bindir, str):
        raise ConfigError(f"{where}.pg_bindir must be a directory path")
    return PitrConfig(enabled=enabled, slot=slot, base_schedule=base_schedule,
                      keep_days=float(keep_days), ship_interval=float(interval),
                      lag_alarm_mb=int(alarm), pg_bindir=bindir)


def _where(tid: str, engine: str, raw: Mapping[str, object], base: Path) -> tuple[str, str]:
    """The target's url (servers: never with a password in it) or path (sqlite)."""
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
    return url, path


def _schedule(tid: str, raw: Mapping[str, object]) -> tuple[str, str, str, Any]:
    """timezone, schedule, catch_up and schedule_jitter, checked."""
    tz = str(raw.get("timezone", "UTC"))
    schedules.zone(tz, f"targets.{tid}.timezone")
    schedule = str(raw.get("schedule", ""))
    if schedule:
        schedules.validate(schedule, f"targets.{tid}.schedule")
    catch_up = str(raw.get("catch_up", "latest"))
    if catch_up not in ("latest", "none"):
        raise ConfigError(f"targets.{tid}.catch_up must be \"latest\" or \"none\"")
    jitter = cast_value(f"targets.{tid}.schedule_jitter", raw.get("schedule_jitter", 0), 0)
    if not 0 <= jitter <= 86400:
        raise ConfigError(f"targets.{tid}.schedule_jitter must be 0-86400 seconds")
    return tz, schedule, catch_up, jitter


def _globals(tid: str, engine: str, raw: Mapping[str, object]
             ) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """globals, and a server target's databases/exclude (which always carry globals)."""
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
    return with_globals, databases, exclude


def _server_set(tid: str, engine: str, raw: Mapping[str, object]
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

    def names(value: object, key: str) -> tuple[str, ...]:
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


def _http_url(tid: str, key: str, raw: Mapping[str, object]) -> str:
    value = str(raw.get(key, ""))
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(f"targets.{tid}.{key} must be an http(s) URL")
    return value


def _severity(tid: str, raw: Mapping[str, object]) -> str:
    value = str(raw.get("notify_min_severity", ""))
    if value not in ("", "info", "warning", "error"):
        raise ConfigError(f"targets.{tid}.notify_min_severity must be info, warning or error")
    return value


def _verify_schedule(tid: str, raw: Mapping[str, object]) -> str:
    expr = str(raw.get("verify_schedule", ""))
    if expr:
        schedules.validate(expr, f"targets.{tid}.verify_schedule")
    return expr


def _verify_checks(tid: str, raw: Mapping[str, object]) -> tuple[str, ...]:
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


def _compression(tid: str, raw: Mapping[str, object]) -> str:
    if "compression" in raw:
        value = raw["compression"]
        if value not in COMPRESSIONS:
            raise ConfigError(f"targets.{tid}.compression must be one of "
                              f"{', '.join(COMPRESSIONS)}, got {value!r}")
        return str(value)
    return "gzip" if cast_value(f"targets.{tid}.compress", raw.get("compress", True), True) \
        else "none"


def _level(tid: str, raw: Mapping[str, object]) -> int | None:
    if "compression_level" not in raw:
        return None
    level = cast_value(f"targets.{tid}.compression_level", raw["compression_level"], 0)
    if not 0 <= level <= 19:
        raise ConfigError(f"targets.{tid}.compression_level must be 0-19 (gzip uses 0-3)")
    return int(level)


def _destination_names(tid: str, raw: Mapping[str, object]) -> tuple[str, ...]:
    value = raw.get("destinations", ["local"])
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"targets.{tid}.destinations must be a non-empty list of "
                          "destination names, e.g. [\"local\", \"offsite\"]")
    if len(set(value)) != len(value):
        raise ConfigError(f"targets.{tid}.destinations names a destination twice")
    return tuple(value)


def _encryption(tid: str, raw: object, base: Path) -> EncryptionConfig | None:
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
