"""The aiohttp application factory and its middlewares."""

from __future__ import annotations

import logging
import secrets
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web

from api.context import PRINCIPAL, REQUEST_ID, REQUIRED_ROLE, SETTINGS, STREAMS, services_ctx
from api.routes import ROUTES, Role, add_routes, route_of
from shared.config import Settings
from shared.errors import SafeholdError
from shared.redact import redact

log = logging.getLogger("safehold.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as `{"error": {"code", "message"}}` with the right status."""
    request_id = request.headers.get("X-Request-ID") or secrets.token_hex(8)
    request[REQUEST_ID] = request_id
    try:
        resp = await handler(request)
    except SafeholdError as exc:
        resp = web.json_response({"error": exc.to_dict()}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error")
        resp = web.json_response(error_body(code, exc.reason), status=exc.status,
                                 headers={k: v for k, v in exc.headers.items()
                                          if k.lower() in ("allow", "www-authenticate")})
    except Exception as exc:
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path,
                      request_id)
        resp = web.json_response(error_body(
            "internal_error", redact(f"internal error (request {request_id}): "
                                     f"{type(exc).__name__}")), status=500)
    if not resp.prepared:
        resp.headers["X-Request-ID"] = request_id
    return resp


@web.middleware
async def role_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolves the route's declared role. Token verification arrives with the auth issue;
    until then the API binds to loopback by default and every caller acts as `local`."""
    route = route_of(request)
    if route is not None:
        request[REQUIRED_ROLE] = route.role
        if route.role is not Role.PUBLIC:
            request[PRINCIPAL] = {"subject": "local", "roles": ["admin"]}
    return await handler(request)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware, role_middleware],
                          client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[STREAMS] = weakref.WeakSet()
    app.cleanup_ctx.append(services_ctx)
    add_routes(app, ROUTES)
    return app
