"""Notifications against a local HTTP receiver: signed webhooks with retries, Apprise's
json:// path, failures that never change a job, and the missed-run alert."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from api.app import create_app
from shared.config import Settings, parse_settings
from shared.keys import Keys
from shared.notify import verify_signature
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import backup, running_worker, wait_for

SECRET = "hook-secret-5f1e9a"


class Receiver:
    """Records every request; answers 500 to the first `fail` of them."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers), await request.read()))
        if len(self.requests) <= self.fail:
            return web.Response(status=500)
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def notify_settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str],
                    url: str, **notifications: Any) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["notifications"] = {"webhook_url": url, "webhook_secret_env": "HOOK_SECRET",
                            "min_severity": "info", "retry_delay": 0.05, **notifications}
    return parse_settings(raw, {**test_env, "HOOK_SECRET": SECRET}, base=tmp_path,
                          source="<test>")


async def test_signed_webhook_with_retries(aiohttp_server: Any, aiohttp_client: Any,
                                           redis: Redis, prefix: str, tmp_path: Path,
                                           pg_db: str, test_env: dict[str, str]) -> None:
    """A backup's outcome reaches the webhook after two failed tries; the body is JSON,
    the HMAC verifies (and fails with another secret or an old timestamp)."""
    receiver = Receiver(fail=2)
    server = await aiohttp_server(receiver.app())
    settings = notify_settings(prefix, tmp_path, pg_db, test_env,
                               str(server.make_url("/hooks/safehold")))
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        name = (await backup(api))["result"]["filename"]
        await wait_for(lambda: len(receiver.requests) >= 3, 30, "the webhook")
    assert len(receiver.requests) == 3
    assert len({r[1]["X-Safehold-Delivery"] for r in receiver.requests}) == 1  # one delivery
    path, headers, body = receiver.requests[-1]
    doc = json.loads(body)
    assert path == "/hooks/safehold" and headers["X-Safehold-Event"] == "backup.succeeded"
    assert doc["event"] == "backup.succeeded" and doc["target"] == "main"
    assert doc["data"]["backup"] == name and doc["severity"] == "info"
    sig = headers["X-Safehold-Signature"]
    assert verify_signature(SECRET, sig, body)
    assert not verify_signature("other", sig, body)
    assert not verify_signature(SECRET, sig, body + b" ")
    assert not verify_signature(SECRET, sig, body, now=datetime.now().timestamp() + 3600)
    assert SECRET not in body.decode()


async def test_failed_delivery_never_changes_the_job(
        aiohttp_server: Any, aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    receiver = Receiver(fail=100)
    server = await aiohttp_server(receiver.app())
    settings = notify_settings(prefix, tmp_path, pg_db, test_env, str(server.make_url("/h")),
                               retries=1)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        job = await backup(api)
        await wait_for(lambda: len(receiver.requests) >= 2, 30, "two tries")

        async def audited() -> Any:
            return (await (await api.get("/api/v1/audit?action=notification.failed"))
                    .json())["entries"]

        entries = await wait_for(audited, 30, "the audit entry")
    assert job["status"] == "succeeded"
    assert "webhook backup.succeeded" in entries[0]["detail"]
    text = await (await api.get("/metrics")).text()
    assert "safehold_notifications_failed_total 1.0" in text


async def test_apprise_json_path_and_severity_filter(
        aiohttp_server: Any, aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    """Apprise (json://) gets the failure; with min_severity=error a success sends nothing."""
    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["broken"] = make_raw_config(prefix, tmp_path, None)["targets"]["main"]
    raw["notifications"] = {"apprise_urls_env": "APPRISE_URLS", "min_severity": "error",
                            "retry_delay": 0.05}
    env = {**test_env, "APPRISE_URLS": f"json://127.0.0.1:{server.port}/apprise"}
    settings = parse_settings(raw, env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        await backup(api)
        failed = await (await api.post("/api/v1/targets/broken/backups?wait=60",
                                       json={})).json()
        await wait_for(lambda: receiver.requests, 30, "the apprise post")
    assert failed["status"] == "failed"
    assert len(receiver.requests) == 1  # the success was below min_severity
    path, _, body = receiver.requests[0]
    doc = json.loads(body)
    assert path == "/apprise" and "backup.failed on broken" in doc["title"]
    assert doc["type"] == "failure" and failed["error"]["code"] in doc["message"]


async def test_missed_schedule_alerts_once_and_clears(
        aiohttp_server: Any, aiohttp_client: Any, redis: Redis, prefix: str, tmp_path: Path,
        pg_db: str, test_env: dict[str, str]) -> None:
    """No successful backup for grace × interval: one alert (audit, notification, metric),
    not one per tick; a successful backup clears it and says so."""
    from arq.connections import ArqRedis

    from shared.jobs import JobStore
    from shared.notify import Notifier
    from worker.scheduler import Scheduler

    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    settings = notify_settings(prefix, tmp_path, pg_db, test_env, str(server.make_url("/h")))
    raw_target = settings.targets["main"]
    from dataclasses import replace

    settings = replace(settings, targets={"main": replace(
        raw_target, schedule="0 3 * * *", catch_up="none", missed_grace=1.5)})
    pool = ArqRedis(connection_pool=redis.connection_pool)
    from shared.audit import AuditLog

    keys = Keys(prefix)
    scheduler = Scheduler(settings, pool, JobStore(pool, keys, ttl=3600), Notifier(settings),
                          AuditLog(pool, keys))
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    await scheduler.tick(t0)
    for hours in (24, 36, 37, 48):  # grace: 1.5 days
        await scheduler.tick(t0 + timedelta(hours=hours))
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    entries = (await (await api.get("/api/v1/audit?action=schedule.missed")).json())["entries"]
    assert len(entries) == 1 and "no successful backup" in entries[0]["detail"]
    assert [json.loads(b)["event"] for _, _, b in receiver.requests] == ["schedule.missed"]
    assert 'safehold_schedule_missed{target="main"} 1.0' in \
        await (await api.get("/metrics")).text()
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        await backup(api)
        await wait_for(lambda: any(json.loads(b)["event"] == "schedule.recovered"
                                   for _, _, b in receiver.requests), 30, "recovered")
    assert 'safehold_schedule_missed{target="main"} 0.0' in \
        await (await api.get("/metrics")).text()


async def test_a_target_may_raise_its_own_floor(aiohttp_server: Any, prefix: str,
                                                tmp_path: Path, pg_db: str,
                                                test_env: dict[str, str]) -> None:
    """Global min_severity info, target notify_min_severity error: only errors go out."""
    from dataclasses import replace

    from shared.notify import Notifier

    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    settings = notify_settings(prefix, tmp_path, pg_db, test_env, str(server.make_url("/h")))
    quiet = replace(settings, targets={"main": replace(settings.targets["main"],
                                                       notify_min_severity="error")})
    notifier = Notifier(quiet)
    await notifier.event("backup.succeeded", "main", "fine")
    await notifier.event("backup.partial", "main", "half")
    await notifier.event("backup.failed", "main", "broken")
    assert [json.loads(b)["event"] for _, _, b in receiver.requests] == ["backup.failed"]
