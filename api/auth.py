"""Bearer-token authentication and role checks.

Tokens are JWTs verified against the issuer's JWKS (Keycloak first). The JWKS is fetched
with aiohttp (never blocking the loop), cached by `kid`, and refreshed when an unknown
`kid` appears — at most once per cooldown, one fetch in flight. The algorithm is pinned to
the key's own (`alg: none` and HS256-with-the-public-key confusion are refused before any
signature check). Issuer, expiry, not-before (with a small leeway) and audience or `azp`
are checked.

Roles come from configurable claim paths (`realm_access.roles`,
`resource_access.<client>.roles`). `viewer` < `operator` < `admin`. A role written
`operator:<target>` grants it on that target only; a configured group claim
(`auth.target_claim`) limits a token's global roles to the targets it lists.

Dev mode (no issuer): Safehold makes a local RSA key, serves its JWKS at
`/.well-known/jwks.json`, and `safehold token --role admin` mints tokens with it. They go
through exactly the same verifier.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from api.roles import Role
from shared.config import AuthSettings, Settings
from shared.errors import ConfigError, Forbidden, Unauthorized, Unavailable
from shared.jobs import Requester

DEV_ISSUER = "safehold-dev"
DEV_AUDIENCE = "safehold"
ROLE_NAMES = {Role.VIEWER: "viewer", Role.OPERATOR: "operator", Role.ADMIN: "admin"}


# ---------------------------------------------------------------------- principal
@dataclass(frozen=True)
class Principal:
    subject: str
    client: str | None
    global_role: Role  # PUBLIC when the token has no global role
    scoped: dict[str, Role] = field(default_factory=dict)  # target -> role
    restricted_to: frozenset[str] | None = None  # group-claim limit on the global role
    # the login session (`sid`) or, without one, the token (`jti`): what a one-use
    # confirmation is bound to besides the subject (dev tokens all say `dev`)
    session: str = ""

    def role_for(self, target: str) -> Role:
        base = self.global_role
        if self.restricted_to is not None and target not in self.restricted_to:
            base = Role.PUBLIC
        return max(base, self.scoped.get(target, Role.PUBLIC))

    @property
    def best_role(self) -> Role:
        return max([self.global_role, *self.scoped.values()])

    def targets_visible(self, all_targets: list[str]) -> list[str]:
        return [t for t in all_targets if self.role_for(t) >= Role.VIEWER]

    def to_dict(self) -> Requester:
        return {
            "subject": self.subject,
            "client": self.client,
            "role": ROLE_NAMES.get(self.global_role),
            "scoped": {t: ROLE_NAMES[r] for t, r in self.scoped.items()},
            "restricted_to": sorted(self.restricted_to) if self.restricted_to else None,
        }


# ---------------------------------------------------------------------- JWKS
class JWKSCache:
    """Keys by kid; refresh on an unknown kid with a cooldown and a single fetch in flight."""

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, object]]], cooldown: float) -> None:
        self._fetch = fetch
        self._cooldown = cooldown
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch = float("-inf")
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0

    async def _refresh(self) -> None:
        self.fetches += 1
        try:
            doc = await self._fetch()
            keyset = jwt.PyJWKSet.from_dict(doc)
        except (TimeoutError, aiohttp.ClientError, ValueError, jwt.PyJWKSetError) as exc:
            # the identity provider is down or broken: not the client's fault, try later
            raise Unavailable(f"cannot fetch the issuer's signing keys "
                              f"({type(exc).__name__}); try again shortly",
                              code="jwks_unavailable") from None
        finally:
            self._last_fetch = time.monotonic()
        self._keys = {k.key_id: k for k in keyset.keys if k.key_id}

    async def get(self, kid: str) -> jwt.PyJWK:
        if kid in self._keys:
            return self._keys[kid]
        if self._inflight is None:
            if time.monotonic() - self._last_fetch < self._cooldown:
                raise Unauthorized("token signed with an unknown key", code="invalid_token")
            self._inflight = asyncio.create_task(self._refresh())
        task = self._inflight
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._inflight is task:
                self._inflight = None
        if kid not in self._keys:
            raise Unauthorized("token signed with an unknown key", code="invalid_token")
        return self._keys[kid]


async def bounded_json(resp: aiohttp.ClientResponse, limit: int) -> object:
    """An identity provider's JSON answer, read to at most `limit` bytes (a provider, or
    whatever answers in its place, does not get to fill the API's memory)."""
    parts: list[bytes] = []
    got = 0
    while got <= limit:  # read(n) answers with what has arrived: read to the end
        part = await resp.content.read(limit + 1 - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    if got > limit:
        raise ValueError(f"the answer is larger than {limit >> 10} KiB")
    raw = b"".join(parts)
    try:
        return json.loads(raw) if raw else None
    except RecursionError:
        raise ValueError("the answer is nested too deep") from None


def http_jwks_fetcher(url: str, session_holder: dict[str, aiohttp.ClientSession]
                      ) -> Callable[[], Awaitable[dict[str, object]]]:
    async def fetch() -> dict[str, object]:
        session = session_holder["session"]
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            doc = await bounded_json(resp, 1 << 20)
            if not isinstance(doc, dict):
                raise ValueError("the JWKS is not a JSON object")
            return doc

    return fetch


# ---------------------------------------------------------------------- verifier
def _claim(claims: dict[str, object], path: str) -> object:
    node: object = claims
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


class TokenVerifier:
    """Verifies bearer tokens. A token that verified is remembered for at most
    VERIFIED_TTL seconds (and never past its `exp`): a client sending the same token on
    every request costs one signature check a minute, and a key withdrawn from the JWKS
    stops working within that minute."""

    VERIFIED_TTL = 60.0
    VERIFIED_MAX = 4096

    def __init__(self, auth: AuthSettings, jwks: JWKSCache, *, issuer: str,
                 audiences: list[str], azps: list[str]) -> None:
        self._verified: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self.auth = auth
        self.jwks = jwks
        self.issuer = issuer
        self.audiences = audiences
        self.azps = azps
        client = auth.client_id or (audiences[0] if audiences else "")
        self.role_paths = [p.strip().replace("{client}", client)
                           for p in auth.role_claims.split(",") if p.strip()]
        self.role_names = {auth.role_viewer: Role.VIEWER, auth.role_operator: Role.OPERATOR,
                           auth.role_admin: Role.ADMIN}

    async def verify(self, token: str) -> Principal:
        now = time.time()
        hit = self._verified.get(token)
        if hit is not None and now < hit[0]:
            self._verified.move_to_end(token)
            return hit[1]
        principal, exp = await self._verify(token)
        self._verified[token] = (min(now + self.VERIFIED_TTL, exp), principal)
        if len(self._verified) > self.VERIFIED_MAX:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthorized("malformed bearer token", code="invalid_token") from None
        alg = str(header.get("alg", ""))
        if not alg or alg.lower() == "none" or alg.upper().startswith("HS"):
            raise Unauthorized(f"token algorithm {alg or 'missing'!r} is not accepted",
                               code="invalid_token")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token has no key id (kid)", code="invalid_token")
        key = await self.jwks.get(kid)
        if key.algorithm_name != alg:
            raise Unauthorized(f"token algorithm {alg} does not match its key "
                               f"({key.algorithm_name})", code="invalid_token")
        try:
            claims: dict[str, object] = jwt.decode(
                token, key=key, algorithms=[key.algorithm_name], issuer=self.issuer,
                leeway=self.auth.leeway,
                options={"require": ["exp", "iat", "iss", "sub"], "verify_aud": False})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired", code="invalid_token") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token is not valid yet", code="invalid_token") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token is from another issuer", code="invalid_token") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature does not verify", code="invalid_token") \
                from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token rejected: {exc}", code="invalid_token") from None
        self._check_audience(claims)
        exp = claims["exp"]  # PyJWT checked it is a number; the type says so here
        if not isinstance(exp, int | float):
            raise Unauthorized("token has no valid expiry", code="invalid_token")
        return self._principal(claims), float(exp)

    def _check_audience(self, claims: dict[str, object]) -> None:
        aud = claims.get("aud")
        auds = {aud} if isinstance(aud, str) else \
            {a for a in aud if isinstance(a, str)} if isinstance(aud, list) else set()
        if self.audiences and auds & set(self.audiences):
            return
        if self.azps and claims.get("azp") in self.azps:
            return
        raise Unauthorized("token was not issued for Safehold (audience/azp)",
                           code="invalid_token")

    def _principal(self, claims: dict[str, object]) -> Principal:
        global_role = Role.PUBLIC
        scoped: dict[str, Role] = {}
        for path in self.role_paths:
            values = _claim(claims, path)
            if not isinstance(values, list):
                continue
            for value in values:
                if not isinstance(value, str):
                    continue
                name, _, target = value.partition(":")
                role = self.role_names.get(name)
                if role is None:
                    continue
                if target:
                    scoped[target] = max(role, scoped.get(target, Role.PUBLIC))
                else:
                    global_role = max(global_role, role)
        restricted: frozenset[str] | None = None
        if self.auth.target_claim:
            groups = _claim(claims, self.auth.target_claim)
            if isinstance(groups, list):
                restricted = frozenset(str(g).rstrip("/").rsplit("/", 1)[-1] for g in groups)
        azp = claims.get("azp")
        return Principal(subject=str(claims.get("sub")),
                         client=azp if isinstance(azp, str) else None,
                         global_role=global_role, scoped=scoped, restricted_to=restricted,
                         session=str(claims.get("sid") or claims.get("jti") or ""))


# ---------------------------------------------------------------------- dev mode
def load_or_create_dev_key(path: str) -> rsa.RSAPrivateKey:
    p = Path(path)
    if p.exists():
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{p} is not an RSA private key")
        return key
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    try:
        os.link(tmp, p)  # another process may have won the race: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return load_or_create_dev_key(path)


def dev_jwks(key: rsa.RSAPrivateKey) -> dict[str, object]:
    jwk: dict[str, object] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": _kid(key), "alg": "RS256", "use": "sig"})
    return {"keys": [jwk]}


def _kid(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return "dev-" + hashlib.sha256(der).hexdigest()[:16]


def mint_dev_token(auth: AuthSettings, roles: list[str], *, ttl: float,
                   subject: str = "dev") -> str:
    key = load_or_create_dev_key(auth.dev_key_path)
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "azp": "safehold-cli", "sub": subject,
              "iat": now, "nbf": now, "exp": now + int(ttl), "jti": uuid.uuid4().hex,
              "realm_access": {"roles": roles}}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": _kid(key)})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_dev_bind(settings: Settings) -> None:
    """Dev mode's local key is for a first run on one machine: refuse to serve it beyond."""
    if settings.auth.dev_mode and not is_loopback(settings.server.host) \
            and not settings.auth.dev_allow_network:
        raise ConfigError(
            f"no [auth] issuer is configured (dev mode, local signing key) but the API would "
            f"listen on {settings.server.host}; configure [auth] issuer/audience, bind to "
            "127.0.0.1, or set auth.dev_allow_network = true to force it")


def build_verifier(settings: Settings, session_holder: dict[str, aiohttp.ClientSession]
                   ) -> tuple[TokenVerifier, dict[str, object] | None]:
    """The verifier for these settings, and the dev JWKS to serve (None unless dev mode)."""
    auth = settings.auth
    if auth.dev_mode:
        jwks_doc = dev_jwks(load_or_create_dev_key(auth.dev_key_path))

        async def fetch() -> dict[str, object]:
            return jwks_doc

        cache = JWKSCache(fetch, auth.jwks_cooldown)
        return TokenVerifier(auth, cache, issuer=DEV_ISSUER, audiences=[DEV_AUDIENCE],
                             azps=[]), jwks_doc
    url = auth.jwks_url or f"{auth.issuer.rstrip('/')}/protocol/openid-connect/certs"
    cache = JWKSCache(http_jwks_fetcher(url, session_holder), auth.jwks_cooldown)
    return TokenVerifier(auth, cache, issuer=auth.issuer, audiences=auth.audiences(),
                         azps=auth.azps()), None


def bearer_token(header: str | None) -> str:
    if not header:
        raise Unauthorized("this route needs a bearer token (Authorization: Bearer <JWT>)")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <JWT>'", code="invalid_token")
    return token.strip()


def require(principal: Principal, needed: Role, target: str | None) -> None:
    # "" is a target name (an unknown one), not "no target": never the token's best role
    have = principal.role_for(target) if target is not None else principal.best_role
    if have < needed:
        where = f" on target '{target}'" if target else ""
        raise Forbidden(f"this needs the {ROLE_NAMES[needed]} role{where}; the token has "
                        f"{ROLE_NAMES.get(have, 'no Safehold role')}")
