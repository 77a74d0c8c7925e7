"""Server-sent events: a job's event stream, replayed and then followed live.

Event ids are Redis Stream ids. A client that reconnects with `Last-Event-ID` (or
`?last_event_id=`) receives every later event exactly once. The stream ends after the
job's terminal event (`succeeded`, `failed`, `cancelled`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from typing import Any

from aiohttp import ClientConnectionResetError, web
from aiohttp_sse import sse_response

from api.context import PRINCIPAL, SERVICES, STREAMS
from api.handlers import caller, for_reader, ops
from api.roles import Role
from shared.jobs import TERMINAL

log = logging.getLogger("safehold.api")
# a client that disconnects mid-stream is normal, not an error
CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError, BrokenPipeError)
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
IDLE_S = 5.0  # quiet this long: check whether the job is over


async def job_events(request: web.Request) -> web.StreamResponse:
    try:
        with request.app[SERVICES].long_request(request[PRINCIPAL].subject):
            return await _job_events(request)
    except CLIENT_GONE:
        log.debug("SSE client of %s went away", request.path)
        return web.Response()  # never sent: the connection is gone


async def all_events(request: web.Request) -> web.StreamResponse:
    """Every job's transitions (queued, started, succeeded, failed, cancelled), live.

    Without Last-Event-ID it starts with what happens next; with one it replays from there
    (the global stream keeps the last ~100k transitions)."""
    try:
        with request.app[SERVICES].long_request(request[PRINCIPAL].subject):
            return await _all_events(request)
    except CLIENT_GONE:
        log.debug("SSE client of %s went away", request.path)
        return web.Response()


async def _job_events(request: web.Request) -> web.StreamResponse:
    s = request.app[SERVICES]
    # 404/403 as JSON before the stream starts
    job = await ops(request).job(caller(request), request.match_info["job_id"])
    job_id = job.id
    ping = s.settings.server.sse_ping_interval
    async with sse_response(request, ping_interval=ping) as resp:
        request.app[STREAMS].add(resp)
        last = resp.last_event_id or request.query.get("last_event_id") or "0-0"
        if not _STREAM_ID.match(last):
            last = "0-0"
        async for ev in s.hub.follow(s.keys.events(job_id), last, idle=IDLE_S):
            if not resp.is_connected():
                break
            if ev is None:  # quiet for a while: is there anything left to wait for?
                current = await s.store.find(job_id)
                if current is None or current.terminal:
                    # already past the terminal event (a reconnect after the end) or expired
                    return resp
                continue
            doc = for_reader(ev.to_dict(), request[PRINCIPAL], job.kind, job.target)
            await resp.send(json.dumps(doc), id=ev.id, event=ev.type)
            if ev.type in TERMINAL:
                return resp
    return resp


_META: OrderedDict[str, tuple[str, str]] = OrderedDict()  # job -> (kind, target)
_TEXT: OrderedDict[tuple[str, str, str, bool], str] = OrderedDict()  # -> JSON
_CACHE_MAX = 4096


async def _job_meta(request: web.Request, job_id: str) -> tuple[str, str]:
    """A job's kind and target (they never change): read once for all followers."""
    key = f"{request.app[SERVICES].keys.prefix}:{job_id}"
    if key not in _META:
        found = await request.app[SERVICES].store.find(job_id)
        if found is None:
            return ("", "")  # not cached: it may appear a moment later
        _META[key] = (found.kind, found.target)
        if len(_META) > _CACHE_MAX:
            _META.popitem(last=False)
    return _META[key]


def _rendered(request: web.Request, ev: Any, principal: Any, kind: str, target: str) -> str:
    """The event's JSON as this reader may see it, serialized once per event and view
    (a thousand followers share two strings, not a thousand)."""
    doc = for_reader(ev.to_dict(), principal, kind, target)
    redacted = "error" in doc and doc.get("error") is not ev.data.get("error")
    # stream ids are unique within one stream only: the prefix and job make the key unique
    key = (request.app[SERVICES].keys.prefix, ev.job, ev.id, redacted)
    if key not in _TEXT:
        _TEXT[key] = json.dumps(doc)
        if len(_TEXT) > _CACHE_MAX:
            _TEXT.popitem(last=False)
    return _TEXT[key]


async def _all_events(request: web.Request) -> web.StreamResponse:
    s = request.app[SERVICES]
    async with sse_response(request, ping_interval=s.settings.server.sse_ping_interval) as resp:
        request.app[STREAMS].add(resp)
        last = resp.last_event_id or request.query.get("last_event_id") or "$"
        if not _STREAM_ID.match(last):
            # pin "now" to a concrete id, so nothing slips between two blocking reads
            last = await s.store.latest_global_event_id()
        principal = request[PRINCIPAL]
        jobs: dict[str, tuple[str, str]] = {}  # job -> (kind, target), for scoped tokens
        async for ev in s.hub.follow(s.keys.global_events, last, idle=IDLE_S):
            if not resp.is_connected():
                break
            if ev is None:
                continue
            if ev.job not in jobs:
                jobs[ev.job] = await _job_meta(request, ev.job)
            kind, target = jobs[ev.job]
            if principal.role_for(target) < Role.VIEWER:
                continue
            await resp.send(_rendered(request, ev, principal, kind, target), id=ev.id,
                            event=ev.type)
    return resp

