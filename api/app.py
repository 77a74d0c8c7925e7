"""The aiohttp application factory and its middlewares."""

from __future__ import annotations

import logging
import secrets
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.auth import bearer_token, require
from api.context import (
    PRINCIPAL,
    REQUEST_ID,
    REQUIRED_ROLE,
    SERVICES,
    SETTINGS,
    STREAMS,
    services_ctx,
)
from api.http import CALLER, rest_surface
from api.roles import Role
from api.routes import ROUTES, add_routes, route_of
from api.surfaces.mcp import mcp_ctx
from api.surfaces.metrics import CATALOG_CACHE
from api.surfaces.web import redeem_ticket
from shared import logs
from shared.config import Settings
from shared.errors import SafeholdError, disk_full
from shared.redact import redact

log = logging.getLogger("safehold.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as `{"error": {"code", "message"}}` with the right status."""
    request_id = request.headers.get("X-Request-ID") or secrets.token_hex(8)
    if len(request_id) > 64 or not request_id.isprintable():
        request_id = secrets.token_hex(8)
    request[REQUEST_ID] = request_id
    logs.request_id.set(request_id)
    try:
        resp = await handler(request)
    except SafeholdError as exc:
        resp = web.json_response({"error": exc.to_dict()}, status=exc.status,
                                 headers=exc.headers or None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error")
        resp = web.json_response(error_body(code, exc.reason), status=exc.status,
                                 headers={k: v for k, v in exc.headers.items()
                                          if k.lower() in ("allow", "www-authenticate")})
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("Redis unreachable for %s %s (request %s): %s", request.method,
                    request.path, request_id, type(exc).__name__)
        resp = web.json_response(error_body(
            "redis_unavailable", "Redis (the job queue) is unreachable or saturated; a job "
            "may or may not have been created: look at /api/v1/jobs, or repeat with the "
            "same Idempotency-Key"), status=503, headers={"Retry-After": "5"})
    except OSError as exc:
        if not disk_full(exc):
            log.exception("unhandled error in %s %s (request %s)", request.method,
                          request.path, request_id)
            resp = web.json_response(error_body(
                "internal_error", f"internal error (request {request_id}): OSError"),
                status=500)
        else:  # a full disk is the operator's to fix, and nothing was kept
            log.error("storage full during %s %s (request %s)", request.method,
                      request.path, request_id)
            resp = web.json_response(error_body(
                "storage_full", "no space left on the server's storage: nothing was kept; "
                "free space (or prune) and try again"), status=507)
    except Exception as exc:
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path,
                      request_id)
        resp = web.json_response(error_body(
            "internal_error", redact(f"internal error (request {request_id}): "
                                     f"{type(exc).__name__}")), status=500)
    if not resp.prepared:
        resp.headers["X-Request-ID"] = request_id
        if request.path.startswith(("/api/", "/backup/")):
            resp.headers.setdefault("Cache-Control", "no-store")
    return resp


MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Audit every mutating request, refused ones included, after it has been answered."""
    resp = await handler(request)
    done = request.get(CALLER)
    route = route_of(request)
    if request.method in MUTATING and not (done is not None and done.audited) and \
            (route is None or route.audit):
        principal = request.get(PRINCIPAL)
        status = resp.status
        result = ("ok" if status < 400 else "denied" if status in (401, 403)
                  else "rejected" if status < 500 else "error")
        try:
            await request.app[SERVICES].audit.record(
                action=route.handler.__name__ if route else "unknown_route",
                result=result, status=status,
                subject=principal.subject if principal else None,
                client=principal.client if principal else None,
                via=rest_surface(request),
                target=request.match_info.get("target"),
                backup=request.match_info.get("file") or request.match_info.get("filename"),
                request_id=request.get(REQUEST_ID),
                remote=request.remote, method=request.method, path=request.path)
        except Exception:  # an audit outage must be loud, but not lose the answer
            log.exception("could not write the audit entry for %s %s", request.method,
                          request.path)
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route declares its role: verify the bearer token and check the role (on the
    route's target when it has one)."""
    route = route_of(request)
    if route is None or route.role is Role.PUBLIC:
        return await handler(request)
    request[REQUIRED_ROLE] = route.role
    verifier = request.app[SERVICES].verifier
    header = request.headers.get("Authorization")
    if header is None and route.ticket and "ticket" in request.query:
        principal = await redeem_ticket(request, request.query["ticket"])
    else:
        principal = await verifier.verify(bearer_token(header))
    target = request.match_info.get("target")
    if target is None and route.target_from_query:
        target = request.query.get("database") or request.app[SETTINGS].default_target
    require(principal, route.role, target)
    request[PRINCIPAL] = principal
    return await handler(request)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[audit_middleware, error_middleware, auth_middleware],
                          client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[STREAMS] = weakref.WeakSet()
    app[CATALOG_CACHE] = {}
    app.cleanup_ctx.append(services_ctx)
    app.cleanup_ctx.append(mcp_ctx)
    add_routes(app, ROUTES)
    return app
