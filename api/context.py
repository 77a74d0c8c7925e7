"""Typed app keys and the long-lived resources of the API process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from api.auth import Principal, TokenVerifier, build_verifier
from api.streamhub import StreamHub
from shared import scratch
from shared.audit import AuditLog
from shared.config import Settings
from shared.errors import TooMany
from shared.jobs import JobStore
from shared.keys import Keys
from shared.outage import RedisUnavailable
from shared.outcomes import Outcomes
from shared.queue import connect
from shared.reaper import Reaper
from shared.storage.catalog import Catalog

log = logging.getLogger("safehold.api")
REAP_EVERY = 10.0
MAX_LONG_REQUESTS_PER_SUBJECT = 16  # of the blocking pool's 64 connections


@dataclass
class Services:
    settings: Settings
    keys: Keys
    redis: ArqRedis
    store: JobStore
    catalog: Catalog  # where backups live (every destination)
    verifier: TokenVerifier
    dev_jwks: dict[str, Any] | None
    http: dict[str, aiohttp.ClientSession]
    audit: AuditLog
    # upload validation decompresses and scans whole files: its own small pool, so a burst
    # of uploads (or bombs) queues there and never takes the threads other requests use
    validation_pool: ThreadPoolExecutor
    hub: StreamHub  # one blocking read (its own bounded pool) for every followed stream
    outcomes: Outcomes  # the one terminal path: cancels before start, reaped jobs
    # long-lived requests (SSE streams, ?wait) per subject: each holds a connection of the
    # bounded blocking pool, so one caller may not take them all
    held: dict[str, int] = field(default_factory=dict)
    # (monotonic time, count) of the last nonzero live-worker count: every submit asks,
    # and a heartbeat window is 30 s wide, so a second-old answer is as true
    workers_seen: tuple[float, int] = (0.0, 0)
    # SSO code exchanges under way (at most LOGIN_EXCHANGES; more are a 429)
    logins: int = 0

    @contextlib.contextmanager
    def long_request(self, subject: str) -> Iterator[None]:
        if self.held.get(subject, 0) >= MAX_LONG_REQUESTS_PER_SUBJECT:
            raise TooMany(f"{subject} already has {MAX_LONG_REQUESTS_PER_SUBJECT} event "
                          "streams or waiting requests open; close some (or poll the job)")
        self.held[subject] = self.held.get(subject, 0) + 1
        try:
            yield
        finally:
            self.held[subject] -= 1
            if not self.held[subject]:
                del self.held[subject]


SETTINGS = web.AppKey("settings", Settings)
SERVICES = web.AppKey("services", Services)
STREAMS: web.AppKey[weakref.WeakSet[Any]] = web.AppKey("streams")
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
REQUIRED_ROLE = web.RequestKey("required_role", int)
LOGIN_EXCHANGES = 8  # SSO code exchanges at once (each may wait 15 s on the provider)
ROUTE_TABLE = web.AppKey("route_table", dict)  # (method, path) -> api.routes.Route


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.redis.prefix)
    redis = await connect(settings.redis.url)
    pool = BlockingConnectionPool.from_url(settings.redis.url, max_connections=64, timeout=30)
    blocking = Redis(connection_pool=pool)
    ttl = settings.worker.job_ttl
    # logins exchange codes on a pool of their own: a hanging identity provider cannot
    # take the connections that signing-key refreshes (every token check) need
    http = {"session": aiohttp.ClientSession(),
            "login": aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit=LOGIN_EXCHANGES))}
    verifier, jwks_doc = build_verifier(settings, http)
    store = JobStore(redis, keys, ttl=ttl)
    audit = AuditLog(redis, keys)
    outcomes = Outcomes(settings, redis, store, audit)
    services = Services(settings, keys, redis, store, Catalog(settings),
                        verifier, jwks_doc, http, audit,
                        ThreadPoolExecutor(settings.limits.max_concurrent_validations,
                                           thread_name_prefix="validate"),
                        StreamHub(blocking, redis), outcomes)
    app[SERVICES] = services
    await asyncio.to_thread(scratch.sweep)  # upload checks a killed API left behind
    reaper = asyncio.create_task(_reap_forever(services))
    yield
    reaper.cancel()
    await asyncio.gather(reaper, return_exceptions=True)
    streams: weakref.WeakSet[Any] = app[STREAMS]
    for resp in list(streams):
        with contextlib.suppress(Exception):
            resp.stop_streaming()
    await services.outcomes.close()
    await services.hub.close()
    services.validation_pool.shutdown(wait=False, cancel_futures=True)
    await services.catalog.close()
    await http["session"].close()
    await http["login"].close()
    await blocking.aclose()
    await pool.disconnect()
    await redis.aclose()


async def _reap_forever(services: Services) -> None:
    """The API reaps orphans too, so a job whose only worker died still fails in time."""
    reaper = Reaper(services.outcomes, services.catalog, services.settings.worker)
    while True:
        try:
            await reaper.sweep()
        except (RedisError, RedisUnavailable) as exc:  # an outage: requests say it (503)
            log.debug("reaper: Redis unreachable (%s)", type(exc).__name__)
        except Exception:
            log.exception("reaper failed")
        await asyncio.sleep(reaper.next_pass_in(REAP_EVERY))
