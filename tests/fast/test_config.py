"""Config validation: clear messages naming the key at fault; secrets never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import Secret, load_settings, parse_settings
from shared.errors import ConfigError

BASE: dict[str, Any] = {"targets": {"main": {
    "engine": "postgresql", "url": "postgresql://app@db:5432/app", "password_env": "APP_PW"}}}


def parse(raw: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return parse_settings(raw, env if env is not None else {"APP_PW": "pw-123"},
                          base=Path("/srv"), source="<test>")


def test_defaults_and_password_from_env() -> None:
    """A minimal config gets the seed's port, default Redis and a secret password."""
    s = parse(BASE)
    assert s.server.port == 8081 and s.default_target == "main"
    pw = s.targets["main"].password
    assert isinstance(pw, Secret) and pw.reveal() == "pw-123"
    assert "pw-123" not in repr(s)
    assert s.storage.path == "/srv/backups"


@pytest.mark.parametrize(("raw", "env", "needle"), [
    ({"targets": {"main": {"engine": "oracle", "url": "x://h/d"}}}, {}, "unknown engine"),
    (BASE, {}, "APP_PW (password_env) is not set"),
    ({"targets": {"main": {"engine": "postgresql", "url": "postgresql://a:hunter2@h/d"}}}, {},
     "contains a password"),
    ({"targets": {"main": {"engine": "postgresql", "url": "postgresql://h/d",
                           "password": "hunter2"}}}, {}, "may not be written in the config"),
    ({"targets": {"main": {"engine": "postgresql", "url": "postgresql://h/d",
                           "colour": "red"}}}, {}, "unknown key(s) in [targets.main]: colour"),
    ({**BASE, "server": {"prot": 1}}, {"APP_PW": "x"}, "unknown key(s) in [server]: prot"),
    ({**BASE, "server": {"port": "eighty"}}, {"APP_PW": "x"}, "'server.port' must be an integer"),
    ({"targets": {}}, {}, "no targets configured"),
    ({**BASE, "worker": {"poll_delay": 0}}, {"APP_PW": "x"}, "worker.poll_delay must be more"),
    ({**BASE, "worker": {"poll_delay": -1}}, {"APP_PW": "x"}, "worker.poll_delay must be more"),
    ({**BASE, "default_target": "other"}, {"APP_PW": "x"}, "default_target 'other'"),
    ({"targets": {"Bad Name": {"engine": "sqlite", "path": "x.db"}}}, {}, "target id"),
    ({"targets": {"s": {"engine": "sqlite"}}}, {}, "needs path"),
    ({"targets": {"p": {"engine": "postgresql"}}}, {}, "needs url"),
    ({"targets": {"p": {"engine": "postgresql", "url": "postgresql://h/d",
                        "password_file": "/nonexistent/pw"}}}, {}, "cannot read password_file"),
])
def test_invalid_configs_are_explained(raw: dict[str, Any], env: dict[str, str],
                                       needle: str) -> None:
    """Each invalid config raises ConfigError whose message says what to fix."""
    with pytest.raises(ConfigError) as exc:
        parse(raw, env)
    assert needle in exc.value.message
    assert "hunter2" not in exc.value.message


def test_environment_overrides(tmp_path: Path) -> None:
    """SAFEHOLD_<SECTION>_<KEY> overrides the file, cast to the right type."""
    s = parse(BASE, {"APP_PW": "x", "SAFEHOLD_SERVER_PORT": "9000",
                     "SAFEHOLD_REDIS_URL": "redis://r:6380/2",
                     "SAFEHOLD_WORKER_ORPHAN_AFTER": "12.5"})
    assert s.server.port == 9000
    assert s.redis.url == "redis://r:6380/2"
    assert s.worker.orphan_after == 12.5


def test_password_file(tmp_path: Path) -> None:
    """A password file's trailing newline is not part of the password."""
    (tmp_path / "pw").write_text("from-file\n")
    raw = {"targets": {"p": {"engine": "postgresql", "url": "postgresql://h/d",
                             "password_file": "pw"}}}
    s = parse_settings(raw, {}, base=tmp_path, source="<t>")
    assert s.targets["p"].password.reveal() == "from-file"  # type: ignore[union-attr]


def test_load_settings_file_errors(tmp_path: Path) -> None:
    """A missing or malformed file is reported with its path."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, {})


def test_misspelled_overrides_are_reported(tmp_path: Path) -> None:
    """A SAFEHOLD_* variable nothing reads is said at start-up, with the likely meaning;
    variables the config names (password_env…) and real overrides are not."""
    raw = {"targets": {"t": {"engine": "postgresql", "url": "postgresql://u@h/d",
                             "password_env": "SAFEHOLD_APP_PW"}}}
    env = {"SAFEHOLD_SERVER_PROT": "9000", "SAFEHOLD_SERVER_PORT": "9001",
           "SAFEHOLD_APP_PW": "x", "SAFEHOLD_TOKEN": "t"}
    s = parse_settings(raw, env, base=tmp_path, source="<t>")
    assert s.server.port == 9001
    assert s.warnings == ("environment variable SAFEHOLD_SERVER_PROT is not a Safehold "
                          "setting and is ignored (did you mean SAFEHOLD_SERVER_PORT?)",)


def test_the_deployment_example_config_parses() -> None:
    """deploy/safehold.example.toml is what operators copy: it must be a valid config, in
    today's keys (compression, globals…), with its secrets from the environment only."""
    import re
    import tomllib

    path = Path(__file__).resolve().parents[2] / "deploy" / "safehold.example.toml"
    text = path.read_text()
    envs = set(re.findall(r'_env\s*=\s*"([A-Z0-9_]+)"', text))
    settings = parse_settings(tomllib.loads(text), {e: "x" for e in envs}, base=path.parent,
                              source=str(path))
    main = settings.targets["main"]
    assert main.compression == "zstd" and main.globals and main.password is not None


def test_the_built_in_default_is_the_example_sqlite_target(tmp_path: Path) -> None:
    """`safehold run` with no config at all reads DEFAULT_TOML (a split once lost its
    [targets.example] header: every fresh run then failed)."""
    import tomllib

    from shared.config import DEFAULT_TOML

    settings = parse_settings(tomllib.loads(DEFAULT_TOML), {}, base=tmp_path, source="<default>")
    assert settings.default_target == "example"
    assert settings.targets["example"].engine == "sqlite"
    assert settings.targets["example"].path == str(tmp_path / "data" / "example.db")


@pytest.mark.parametrize("key, value", [("password_env", 5), ("password_env", ["A"]),
                                        ("password_file", {"x": 1})])
def test_a_password_source_that_is_not_a_string_is_a_config_error(
        tmp_path: Path, key: str, value: Any) -> None:
    raw = {"targets": {"s": {"engine": "postgresql", "url": "postgresql://u@h/db",
                             key: value}}}
    with pytest.raises(ConfigError, match=f"targets.s.{key} must be a string"):
        parse_settings(raw, {}, base=tmp_path, source="<t>")


@pytest.mark.parametrize("raw, message", [
    ({"server": 5}, r"\[server\] must be a table"),
    ({"default_target": 5}, "default_target must be a string"),
])
def test_a_section_or_default_target_of_the_wrong_type_is_a_config_error(
        tmp_path: Path, raw: dict[str, Any], message: str) -> None:
    doc = {"targets": {"s": {"engine": "sqlite", "path": "x.db"}}, **raw}
    with pytest.raises(ConfigError, match=message):
        parse_settings(doc, {}, base=tmp_path, source="<t>")


@pytest.mark.parametrize("value, ok", [("04:00", True), ("23:59", True), ("off", True),
                                       ("24:00", False), ("4:00", False), ("never", False)])
def test_the_daily_prune_is_a_time_or_off(tmp_path: Path, value: str, ok: bool) -> None:
    doc = {"worker": {"daily_prune": value},
           "targets": {"s": {"engine": "sqlite", "path": "x.db"}}}
    if ok:
        assert parse_settings(doc, {}, base=tmp_path, source="<t>").worker.daily_prune == value
    else:
        with pytest.raises(ConfigError, match="worker.daily_prune"):
            parse_settings(doc, {}, base=tmp_path, source="<t>")


@pytest.mark.parametrize(("pitr", "engine", "why"), [
    ({"enabled": "yes"}, "postgresql", "enabled must be true or false"),
    ({"enabled": True}, "redis", "built for postgresql and mysql"),
    ({"enabled": True, "slot": "x"}, "mysql", "belong to PostgreSQL"),
    ({"slot": "Bad-Slot"}, "postgresql", "slot must be"),
    ({"base_schedule": "every day"}, "postgresql", "base_schedule"),
    ({"keep_days": 0}, "postgresql", "keep_days must be"),
    ({"ship_interval": 0.01}, "postgresql", "ship_interval must be"),
    ({"lag_alarm_mb": 1}, "postgresql", "lag_alarm_mb must be"),
    ({"pg_bindir": 5}, "postgresql", "pg_bindir must be"),
    ({"slots": "x"}, "postgresql", "unknown key"),
    ("on", "postgresql", "must be a table"),
])
def test_a_pitr_table_is_checked(tmp_path: Path, pitr: object, engine: str,
                                  why: str) -> None:
    raw = {"targets": {"app": {"engine": engine, "url": f"{engine}://u@h/db",
                               "pitr": pitr}}}
    with pytest.raises(ConfigError, match=why):
        parse_settings(raw, {}, base=tmp_path, source="<t>")


def test_a_pitr_table_defaults(tmp_path: Path) -> None:
    raw = {"targets": {"my-app": {"engine": "postgresql", "url": "postgresql://u@h/db",
                                  "pitr": {"enabled": True, "keep_days": 2}}}}
    pitr = parse_settings(raw, {}, base=tmp_path, source="<t>").targets["my-app"].pitr
    assert pitr is not None and pitr.enabled and pitr.slot == "safehold_my_app"
    assert pitr.keep_days == 2.0 and pitr.ship_interval == 1.0
