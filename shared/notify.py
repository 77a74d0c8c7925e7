"""Notifications: job outcomes and alerts to people and systems.

Two kinds of channel:
* **Apprise** URLs (Slack, Discord, Teams, Telegram, ntfy, Gotify, Matrix, e-mail and ~100
  more: `slack://…`, `ntfy://…`, `mailto://…`) — one well-kept library, no hand-written
  clients. URLs carry tokens, so they come from an environment variable or a file.
* Our own **webhook**: a JSON body, `X-Safehold-Event`, and `X-Safehold-Signature:
  t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the shared secret>` so a receiver
  can check origin and refuse replays (compare t with its clock).
Each delivery is retried with backoff; a failure is logged, counted and audited and never
changes a job's status. Per target, `heartbeat_url` gets healthchecks.io-style pings
(`/start`, success, `/fail`) around scheduled backups.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NotRequired, TypedDict

import aiohttp

from shared.config import NotificationSettings, Secret, Settings
from shared.errors import ConfigError

log = logging.getLogger("safehold.notify")
SEVERITIES = {"info": 0, "warning": 1, "error": 2}
EVENT_SEVERITY = {
    "backup.succeeded": "info", "backup.partial": "warning", "backup.failed": "error",
    "restore.succeeded": "info", "restore.failed": "error", "restore.cancelled": "warning",
    "prune.deleted": "info", "prune.failed": "error",
    "verify.succeeded": "info", "verify.failed": "error",
    "schedule.missed": "error", "schedule.recovered": "info",
    "pitr.gap": "error", "pitr.lagging": "warning",
}


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(secret: str, header: str, body: bytes, *, now: float | None = None,
                     window: float = 300) -> bool:
    """What a receiver does (and our tests): the MAC matches and the time is recent."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - ts) > window:
        return False
    return hmac.compare_digest(signature(secret, ts, body), header)


class Notification(TypedDict):
    """One event as every channel gets it (the webhook's JSON body)."""

    id: str  # the same on every retry: receivers drop duplicates
    event: str
    severity: str
    target: str
    message: str
    time: str
    data: NotRequired[Mapping[str, object]]


# (channel, event, error): a delivery given up on is audited and counted
FailureRecorder = Callable[[str, str, str], Awaitable[None]]


@dataclass
class Notifier:
    settings: Settings
    record_failure: FailureRecorder | None = None
    _apprise_urls: list[str] = field(default_factory=list)
    _secret: Secret | None = None

    def __post_init__(self) -> None:
        n: NotificationSettings = self.settings.notifications
        self._apprise_urls = load_apprise_urls(n)
        self._secret = n.webhook_secret

    @property
    def enabled(self) -> bool:
        n = self.settings.notifications
        return bool(self._apprise_urls or n.webhook_url)

    async def event(self, event: str, target: str, message: str,
                    data: Mapping[str, object] | None = None) -> None:
        """Send one event to every channel whose minimum severity it reaches."""
        n = self.settings.notifications
        severity = EVENT_SEVERITY.get(event, "info")
        t = self.settings.targets.get(target)
        floor = t.notify_min_severity if t and t.notify_min_severity else n.min_severity
        if not self.enabled or SEVERITIES[severity] < SEVERITIES[floor]:
            return
        if n.event_list and event not in n.event_list:
            return
        doc: Notification = {
            "id": uuid.uuid4().hex, "event": event, "severity": severity, "target": target,
            "message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if data:
            doc["data"] = data
        await asyncio.gather(self._webhook(doc), self._apprise(doc))

    async def _retry(self, channel: str, event: str,
                     attempt: Callable[[], Awaitable[None]]) -> None:
        n = self.settings.notifications
        delay = n.retry_delay
        for i in range(n.retries + 1):
            try:
                await attempt()
                return
            except Exception as exc:
                if i == n.retries:
                    log.warning("notification %s via %s failed after %d tries: %s", event,
                                channel, i + 1, exc)
                    if self.record_failure is not None:
                        await self.record_failure(channel, event,
                                                  (str(exc) or type(exc).__name__)[:300])
                    return
                await asyncio.sleep(delay)
                delay *= 2

    async def _webhook(self, doc: Notification) -> None:
        n = self.settings.notifications
        if not n.webhook_url:
            return
        body = json.dumps(doc, sort_keys=True).encode()

        async def post() -> None:
            headers = {"Content-Type": "application/json", "X-Safehold-Event": doc["event"],
                       "X-Safehold-Delivery": doc["id"], "User-Agent": "safehold"}
            if self._secret is not None:
                headers["X-Safehold-Signature"] = signature(self._secret.reveal(),
                                                            int(time.time()), body)
            timeout = aiohttp.ClientTimeout(total=n.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as http, \
                    http.post(n.webhook_url, data=body, headers=headers) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"HTTP {resp.status}")

        await self._retry("webhook", doc["event"], post)

    async def _apprise(self, doc: Notification) -> None:
        if not self._apprise_urls:
            return
        import apprise

        kind = {"info": apprise.NotifyType.INFO, "warning": apprise.NotifyType.WARNING,
                "error": apprise.NotifyType.FAILURE}[doc["severity"]]
        title = f"Safehold: {doc['event']} on {doc['target']}"

        async def send() -> None:
            ap = apprise.Apprise()
            for url in self._apprise_urls:
                ap.add(url)
            ok = await asyncio.to_thread(ap.notify, body=doc["message"], title=title,
                                         notify_type=kind)
            if not ok:
                raise RuntimeError("apprise reported a failed delivery")

        await self._retry("apprise", doc["event"], send)

    async def heartbeat(self, url: str, outcome: str) -> None:
        """healthchecks.io-style: `<url>/start`, `<url>` (success), `<url>/fail`."""
        if not url:
            return
        full = url.rstrip("/") + {"start": "/start", "success": "", "fail": "/fail"}[outcome]

        async def ping() -> None:
            timeout = aiohttp.ClientTimeout(total=self.settings.notifications.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as http, \
                    http.get(full) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"HTTP {resp.status}")

        await self._retry("heartbeat", f"heartbeat.{outcome}", ping)


def load_apprise_urls(n: NotificationSettings) -> list[str]:
    urls: list[str] = []
    if n.apprise_urls is not None:
        urls += n.apprise_urls.reveal().split()
    if n.apprise_urls_file:
        try:
            urls += [ln.strip() for ln in Path(n.apprise_urls_file).read_text().splitlines()
                     if ln.strip() and not ln.strip().startswith("#")]
        except OSError as exc:
            raise ConfigError(f"notifications.apprise_urls_file cannot be read "
                              f"({exc.strerror})") from None
    return urls
