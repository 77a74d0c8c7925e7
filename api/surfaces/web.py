"""The web page at `/` (static files in `api/web/`, no build step, no CDN), the identity
it shows (`/api/v1/whoami`), and download tickets: a browser link cannot carry an
`Authorization` header, and a long-lived token must never sit in a URL, so the page asks
for a ticket — one use, 60 seconds, bound to one download path and to who asked (kept as
the verified identity and roles, never the token; the roles are checked again on use)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from api.auth import Principal, bounded_json
from api.context import LOGIN_EXCHANGES, PRINCIPAL, SERVICES
from api.http import json_body, read_json
from api.roles import Role
from api.schemas import DOWNLOAD_PATH
from shared.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    TooMany,
    Unauthorized,
    Unavailable,
)

WEB_DIR = Path(__file__).resolve().parents[1] / "web"  # api/web: the page's files
TICKET_TTL = 60
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_STATIC = {"app.js": "text/javascript", "app.css": "text/css"}


async def index(request: web.Request) -> web.Response:
    return web.Response(body=(WEB_DIR / "index.html").read_bytes(), content_type="text/html",
                        headers=PAGE_HEADERS)


async def static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in _STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=(WEB_DIR / name).read_bytes(), content_type=_STATIC[name],
                        headers=PAGE_HEADERS)


async def whoami(request: web.Request) -> web.Response:
    """The token's subject, global role and role on each target it may see."""
    p = request[PRINCIPAL]
    names = {Role.VIEWER: "viewer", Role.OPERATOR: "operator", Role.ADMIN: "admin"}
    targets = request.app[SERVICES].settings.targets
    return web.json_response({
        "subject": p.subject, "client": p.client,
        "role": names.get(p.global_role),
        "targets": {t: names[p.role_for(t)] for t in p.targets_visible(list(targets))}})


_DOWNLOAD_PATH = re.compile(DOWNLOAD_PATH["pattern"])


def _ticket_key(request: web.Request, ticket: str) -> str:
    prefix = request.app[SERVICES].keys.prefix
    return f"{prefix}:ticket:{hashlib.sha256(ticket.encode()).hexdigest()}"


async def create_ticket(request: web.Request) -> web.Response:
    """POST {"path": "/api/v1/targets/t/backups/f/download"} -> {"url": path?ticket=…}."""
    path = (await read_json(request)).get("path")
    if not isinstance(path, str) or not _DOWNLOAD_PATH.fullmatch(path):  # no final \n
        raise BadRequest("path must be a backup's download path: /api/v1/targets/<target>/"
                         "backups/<backup>/download", code="invalid_body")
    ticket = secrets.token_urlsafe(32)
    p = request[PRINCIPAL]  # who asked, as verified now (never the token itself)
    await request.app[SERVICES].redis.set(
        _ticket_key(request, ticket), json.dumps({
            "path": path, "subject": p.subject, "client": p.client,
            "role": int(p.global_role), "scoped": {t: int(r) for t, r in p.scoped.items()},
            "restricted_to": sorted(p.restricted_to) if p.restricted_to is not None
            else None}), ex=TICKET_TTL)
    return web.json_response({"url": f"{path}?ticket={ticket}", "expires_in": TICKET_TTL})


async def redeem_ticket(request: web.Request, ticket: str) -> Principal:
    """Who a ticket stands for (its roles are checked on the route as for a token); the
    ticket is gone afterwards (a HEAD does not use it up); 401 unless it is live and for
    this very path."""
    redis = request.app[SERVICES].redis
    key = _ticket_key(request, ticket)
    raw = await (redis.get(key) if request.method == "HEAD" else redis.getdel(key))
    doc = json.loads(raw) if raw else None
    if not doc or doc.get("path") != request.path:
        raise Unauthorized("the download ticket is unknown, used, expired or for another "
                           "file", code="invalid_ticket")
    restricted = doc.get("restricted_to")
    return Principal(subject=str(doc["subject"]), client=doc.get("client"),
                     global_role=Role(int(doc["role"])),
                     scoped={str(t): Role(int(r)) for t, r in doc["scoped"].items()},
                     restricted_to=frozenset(restricted) if restricted is not None else None)


# ---------------------------------------------------------------------- SSO (PKCE)
_DISCOVERY: dict[str, tuple[float, dict[str, str]]] = {}  # issuer -> (when, endpoints)
DISCOVERY_TTL = 3600.0  # a provider that moves its endpoints is followed within the hour
DISCOVERY_MAX, TOKEN_ANSWER_MAX = 256 << 10, 64 << 10


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urlsplit(url.strip())
    scheme = u.scheme.lower()
    return scheme, (u.hostname or "").lower(), u.port or {"https": 443, "http": 80}.get(scheme)


async def _endpoints(request: web.Request) -> dict[str, str]:
    """The issuer's authorization and token endpoints (OpenID discovery, cached an hour).
    Both must be on the issuer's own origin: a discovery document (or whatever answered
    in its place) does not get to send login codes elsewhere."""
    auth = request.app[SERVICES].settings.auth
    cached = _DISCOVERY.get(auth.issuer)
    if cached is not None and time.monotonic() - cached[0] < DISCOVERY_TTL:
        return cached[1]
    session = request.app[SERVICES].http["login"]
    url = auth.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            doc = await bounded_json(resp, DISCOVERY_MAX)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise Unavailable(f"the identity provider's discovery document ({url}) could "
                          f"not be read: {type(exc).__name__}", code="idp_unreachable") \
            from None
    ends = {k: str(doc[k]) for k in ("authorization_endpoint", "token_endpoint") if k in doc}
    allowed = {_origin(auth.issuer)} | {_origin(o) for o in
                                        auth.idp_endpoint_origins.split(",") if o.strip()}
    for k, v in ends.items():
        if _origin(v) not in allowed:
            raise Unavailable(f"the identity provider's {k} ({v[:200]}) is not on the "
                              f"issuer's origin ({auth.issuer}); Safehold sends login codes "
                              "there only, or to [auth] idp_endpoint_origins",
                              code="idp_misconfigured")
    _DISCOVERY[auth.issuer] = (time.monotonic(), ends)
    return ends


async def login_config(request: web.Request) -> web.Response:
    """What the page offers: SSO through the issuer (authorization code + PKCE) when
    `auth.web_client_id` is configured, else pasting a token."""
    auth = request.app[SERVICES].settings.auth
    if auth.dev_mode or not auth.web_client_id:
        return web.json_response({"oidc": None, "dev_mode": auth.dev_mode})
    if not request.app[SERVICES].settings.server.public_url:
        return web.json_response({"oidc": None, "dev_mode": False,
                                  "sso_unavailable": "SSO needs [server] public_url"})
    ends = await _endpoints(request)
    return web.json_response({"dev_mode": False, "oidc": {
        "issuer": auth.issuer, "client_id": auth.web_client_id,
        "authorization_endpoint": ends.get("authorization_endpoint")}})


async def login_token(request: web.Request) -> web.Response:
    """Exchange the page's authorization code (with its PKCE verifier) at the issuer's
    token endpoint — from here, so the page needs no cross-origin call — and hand back
    the access token once Safehold itself accepts it."""
    s = request.app[SERVICES]
    auth = s.settings.auth
    if auth.dev_mode or not auth.web_client_id:
        raise NotFound("SSO login is not configured (auth.issuer, auth.web_client_id)",
                       code="sso_disabled")
    body = await json_body(request)
    fields = {k: body.get(k) if isinstance(body, dict) else None
              for k in ("code", "code_verifier", "redirect_uri")}
    if not all(isinstance(v, str) and 0 < len(v) < 4096 for v in fields.values()):
        raise BadRequest("code, code_verifier and redirect_uri are required",
                         code="invalid_body")
    public = s.settings.server.public_url.rstrip("/")
    if not public:  # the Host header is the client's to choose: never the page's address
        raise NotFound("SSO login needs [server] public_url (the address users open the "
                       "page at, registered as the redirect URI)", code="sso_disabled")
    page_url = public + "/"
    if fields["redirect_uri"] != page_url:
        raise BadRequest(f"redirect_uri must be this page ({page_url})", code="invalid_body")
    if s.logins >= LOGIN_EXCHANGES:
        err = TooMany(f"{LOGIN_EXCHANGES} logins are being exchanged with the identity "
                      "provider already; try again in a moment", code="too_many_logins")
        err.headers = {"Retry-After": "2"}
        raise err
    s.logins += 1
    try:
        ends = await _endpoints(request)
        form = {"grant_type": "authorization_code", "client_id": auth.web_client_id,
                **fields}
        async with s.http["login"].post(ends["token_endpoint"], data=form,
                                        timeout=aiohttp.ClientTimeout(total=15)) as resp:
            status = resp.status
            doc = await bounded_json(resp, TOKEN_ANSWER_MAX)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        raise Unavailable(f"the identity provider's token endpoint failed: "
                          f"{type(exc).__name__}", code="idp_unreachable") from None
    finally:
        s.logins -= 1
    if status >= 400 or not isinstance(doc, dict) or "access_token" not in doc:
        reason = doc.get("error") if isinstance(doc, dict) else None
        raise Unauthorized(f"the identity provider refused the login ({reason or status})",
                           code="login_refused")
    principal = await s.verifier.verify(str(doc["access_token"]))
    if principal.best_role < Role.VIEWER:
        raise Forbidden(f"{principal.subject} has no Safehold role (viewer, operator or "
                        "admin) — ask an admin to grant one", code="forbidden")
    return web.json_response({"access_token": doc["access_token"],
                              "expires_in": doc.get("expires_in")})
