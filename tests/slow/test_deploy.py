"""deploy/ checked without a Docker engine: the Dockerfile's, compose file's and systemd
units' invariants (the traps a first deployment fell into), and `systemd-analyze verify`
on the units where systemd is present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent


def dockerfile_steps() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest))
    return steps


def test_the_volume_exists_owned_by_the_service_user_before_volume() -> None:
    steps = dockerfile_steps()
    volume = next(i for i, (w, _) in enumerate(steps) if w == "VOLUME")
    paths = re.findall(r'"([^"]+)"', steps[volume][1])
    assert "/var/lib/safehold/backups" in paths
    for path in paths:
        made = [i for i, (w, r) in enumerate(steps) if w == "RUN" and "mkdir -p" in r
                and f" {path}" in r and "chown -R safehold:safehold" in r]
        assert made and made[0] < volume, path
    user = next(i for i, (w, r) in enumerate(steps) if w == "USER")
    assert steps[user][1] == "safehold" and user < volume
    assert any(w == "HEALTHCHECK" for w, _ in steps)


def test_the_image_can_drill_redis_and_keeps_the_dev_key_off_the_backups_volume() -> None:
    """Issue 22, item 10: a Redis drill needs redis-server in the image; the dev signing
    key lives on a volume of its own (a copy of the backups must not mint tokens)."""
    steps = dockerfile_steps()
    assert any(w == "RUN" and re.search(r"apt-get install .*\bredis-server\b", r)
               for w, r in steps)
    env = " ".join(r for w, r in steps if w == "ENV")
    key = re.search(r"SAFEHOLD_AUTH_DEV_KEY_PATH=(\S+)", env)
    assert key and not key[1].startswith("/var/lib/safehold/backups/")
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    shared = doc["x-safehold"]
    assert "SAFEHOLD_AUTH_DEV_KEY_PATH" not in shared["environment"]  # the image's
    mounts = {m.split(":")[1] for m in shared["volumes"]}
    assert str(Path(key[1]).parent) in mounts and "/var/lib/safehold/backups" in mounts


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv/", "backups/", ".git/", "deploy/app_db_password.txt"):
        assert entry in ignored


def test_compose_builds_once_restarts_waits_for_health_and_checks_the_worker() -> None:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = doc["services"]
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["api"]
    assert services["api"]["image"] == services["worker"]["image"]
    assert services["worker"]["pull_policy"] == "never"
    for name in ("api", "worker", "redis", "postgres"):
        assert services[name]["restart"] == "unless-stopped"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert "healthcheck" in services["redis"] and "healthcheck" in services["postgres"]
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "safehold", "worker",
                                                          "--check"]
    grace = services["worker"]["stop_grace_period"]
    assert grace.endswith("m") and int(grace[:-1]) * 60 > 600  # above shutdown_grace
    assert "safehold token" in (DEPLOY / "docker-compose.yml").read_text()


def unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize("name", ["safehold-api.service", "safehold-worker.service"])
def test_systemd_units(name: str) -> None:
    u = unit(name)
    assert u["RestartPreventExitStatus"] == ["2"]  # a config error is not restarted forever
    assert u["User"] == ["safehold"] and u["ReadWritePaths"] == ["/var/lib/safehold"]
    if "worker" in name:
        assert int(u["TimeoutStopSec"][0]) > 600  # above [worker] shutdown_grace
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    result = subprocess.run([analyze, "verify", str(DEPLOY / "systemd" / name)],
                            capture_output=True, text=True, timeout=60)
    # the unit's own lines must be clean; the machine may lack the user or the binary
    problems = [ln for ln in result.stderr.splitlines()
                if any(word in ln for word in ("Unknown", "Invalid", "Failed to parse"))]
    assert problems == [], result.stderr
