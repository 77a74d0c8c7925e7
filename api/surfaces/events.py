"""Server-sent events: a job's event stream, replayed and then followed live.

Event ids are Redis Stream ids. A client that reconnects with `Last-Event-ID` (or
`?last_event_id=`) receives every later event exactly once. The stream ends after the
job's terminal event (`succeeded`, `failed`, `cancelled`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict

from aiohttp import ClientConnectionResetError, web
from aiohttp_sse import EventSourceResponse, sse_response

from api.auth import Principal
from api.context import PRINCIPAL, SERVICES, STREAMS
from api.http import EVENT_ID_RE, caller, for_reader, ops
from api.roles import Role
from shared.errors import BadRequest
from shared.jobs import TERMINAL, Event, JobKind, JobStore

log = logging.getLogger("safehold.api")
# a client that disconnects mid-stream is normal, not an error
CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError, BrokenPipeError)
# a Redis stream id; 19 digits a part always fit its 64 bits (and the API schema says so)


def resume_from(request: web.Request) -> str | None:
    """The event id to resume after (Last-Event-ID, or ?last_event_id=), checked before
    the stream starts: anything but a stream id (an empty one included) is a 400, never
    a broken stream."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id")
    if raw is None:
        return None
    if not EVENT_ID_RE.match(raw):
        raise BadRequest("Last-Event-ID must be an event id as sent in `id:` (such as "
                         "1700000000000-0)", code="invalid_last_event_id")
    return raw
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
    last = resume_from(request) or "0-0"
    async with sse_response(request, ping_interval=ping) as resp:
        request.app[STREAMS].add(resp)
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
_TEXT: OrderedDict[tuple[str, str, str, int], bytes] = OrderedDict()  # -> SSE frame
SEND_TIMEOUT = 10.0
_CACHE_MAX = 4096


_READING: dict[str, asyncio.Task[tuple[str, str]]] = {}  # key -> the one read under way


async def _job_meta(request: web.Request, job_id: str) -> tuple[str, str]:
    """A job's kind and target (they never change): read once for all followers — a
    thousand of them meeting a new job at the same moment share one read (its own task:
    a follower that leaves cancels only its wait)."""
    key = f"{request.app[SERVICES].keys.prefix}:{job_id}"
    if key in _META:
        return _META[key]
    task = _READING.get(key)
    if task is None:
        task = asyncio.ensure_future(_read_meta(request.app[SERVICES].store, job_id, key))
        _READING[key] = task
        task.add_done_callback(lambda _: _READING.pop(key, None))
    return await asyncio.shield(task)


async def _read_meta(store: JobStore, job_id: str, key: str) -> tuple[str, str]:
    found = await store.find(job_id)
    if found is None:
        return ("", "")  # not cached: it may appear a moment later
    _META[key] = (found.kind, found.target)
    if len(_META) > _CACHE_MAX:
        _META.popitem(last=False)
    return _META[key]


def _frame(request: web.Request, ev: Event, principal: Principal, kind: str,
           target: str) -> bytes:
    """The event as this reader may see it, as the whole SSE frame, rendered once per event
    and view (a thousand followers share two frames, not a thousand)."""
    # what a reader sees depends on its role on the target (viewer, operator, admin):
    # one frame per role, never one role's frame served to another
    level = min(int(principal.role_for(target)), int(Role.ADMIN))
    # stream ids are unique within one stream only: the prefix and job make the key unique
    key = (request.app[SERVICES].keys.prefix, ev.job, ev.id, level)
    if key not in _TEXT:  # json.dumps escapes newlines: one data line
        doc = for_reader(ev.to_dict(), principal, kind, target)
        _TEXT[key] = f"id: {ev.id}\r\nevent: {ev.type}\r\ndata: {json.dumps(doc)}\r\n\r\n" \
            .encode()
        if len(_TEXT) > _CACHE_MAX:
            _TEXT.popitem(last=False)
    return _TEXT[key]


async def _send_frame(request: web.Request, resp: EventSourceResponse, frame: bytes) -> None:
    """aiohttp-sse's `send` for a frame rendered beforehand: a client that stalls longer
    than SEND_TIMEOUT is cut off (and counts as gone)."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await resp.write(frame)
    except TimeoutError:
        resp.stop_streaming()
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client stopped reading") from None
    except ConnectionResetError:
        resp.stop_streaming()
        raise


async def _all_events(request: web.Request) -> web.StreamResponse:
    s = request.app[SERVICES]
    # without one, "now" pinned to a concrete id, so nothing slips between two reads
    last = resume_from(request) or await s.store.latest_global_event_id()
    async with sse_response(request, ping_interval=s.settings.server.sse_ping_interval) as resp:
        request.app[STREAMS].add(resp)
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
            if not kind:  # the job's record expired: show its errors as a restore's
                kind = JobKind.RESTORE  # (operators of its target only), the cautious one
            await _send_frame(request, resp, _frame(request, ev, principal, kind, target))
    return resp

