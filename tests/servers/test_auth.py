"""Bearer-token verification against a forged issuer (real RSA keys, a real JWKS server),
the role matrix over the whole route table, and dev mode."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import replace
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from api.app import create_app
from api.auth import check_dev_bind
from api.roles import Role
from api.routes import ROUTES
from shared.config import AuthSettings, Settings, TargetConfig
from shared.errors import ConfigError

ISSUER_PATH = "/realms/ops"
BACKUP = "backup_postgresql_20240101_000000.sql.gz"


class Issuer:
    """A fake Keycloak realm: RSA keys, a JWKS endpoint, and a token factory."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {"k1": self.new_key()}
        self.published = ["k1"]
        self.jwks_hits = 0
        self.url = ""

    @staticmethod
    def new_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            jwk = json.loads(RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        # Keycloak also publishes an encryption key: it must be skipped
        keys.append({"kid": "enc", "kty": "RSA", "use": "enc", "alg": "RSA-OAEP",
                     "n": keys[0]["n"], "e": "AQAB"})
        return {"keys": keys}

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        base = {"iss": self.url + ISSUER_PATH, "sub": "user-1", "aud": "account",
                "azp": "safehold", "iat": now, "nbf": now, "exp": now + 300,
                "realm_access": {"roles": ["offline_access"]},
                "resource_access": {"safehold": {"roles": []}}}
        base.update(over)
        return base

    def token(self, roles: list[str] | None = None, kid: str = "k1", **over: Any) -> str:
        claims = self.claims(**over)
        if roles is not None:
            claims["resource_access"] = {"safehold": {"roles": roles}}
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture
async def issuer(aiohttp_server: Any) -> Issuer:
    iss = Issuer()

    async def certs(_: web.Request) -> web.Response:
        iss.jwks_hits += 1
        await asyncio.sleep(0.05)  # slow enough for concurrent refreshes to overlap
        return web.json_response(iss.jwks())

    app = web.Application()
    app.router.add_get(f"{ISSUER_PATH}/protocol/openid-connect/certs", certs)
    server = await aiohttp_server(app)
    iss.url = str(server.make_url("")).rstrip("/")
    return iss


@pytest.fixture
def oidc_settings(settings: Settings, issuer: Issuer) -> Settings:
    auth = AuthSettings(issuer=issuer.url + ISSUER_PATH, audience="safehold-api",
                        allowed_azp="safehold", client_id="safehold",
                        jwks_cooldown=2.0, leeway=5)
    other = TargetConfig(id="other", engine="postgresql", url="postgresql://u@127.0.0.1:1/x")
    server = replace(settings.server, wait_timeout=0.2)  # no worker here: seed calls answer 202
    return replace(settings, auth=auth, server=server,
                   targets={**settings.targets, "other": other})


@pytest.fixture
async def client(aiohttp_client: Any, oidc_settings: Settings, redis: Any) -> Any:
    return await aiohttp_client(create_app(oidc_settings))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def status_and_code(resp: Any) -> tuple[int, str | None]:
    body = await resp.json() if resp.content_type == "application/json" else {}
    return resp.status, (body.get("error") or {}).get("code")


def bad_tokens(iss: Issuer) -> dict[str, str]:
    now = int(time.time())
    admin = ["admin"]
    good = iss.token(admin)
    head, payload, sig = good.split(".")
    tampered_claims = iss.claims(resource_access={"safehold": {"roles": admin}})
    tampered_claims["sub"] = "someone-else"
    public_pem = iss.keys["k1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs = _hs256_with(public_pem, iss.claims(resource_access={"safehold": {"roles": admin}}))
    return {
        "malformed": "not.a.jwt",
        "garbage": "abc",
        "expired": iss.token(admin, exp=now - 60, iat=now - 400, nbf=now - 400),
        "not yet valid": iss.token(admin, nbf=now + 120, iat=now),
        "wrong issuer": iss.token(admin, iss="https://evil.example/realms/ops"),
        "wrong audience and azp": iss.token(admin, aud="other-api", azp="other-client"),
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}."
                    f"{b64(iss.claims(resource_access={'safehold': {'roles': admin}}))}.",
        "HS256 signed with the public key": hs,
        "tampered payload": f"{head}.{b64(tampered_claims)}.{sig}",
        "unknown kid": _with_new_key(iss, "k-unknown", admin),
        # signed by the issuer, but claims of the wrong shape: refused, never a 500
        "audience a number": iss.token(admin, aud=5, azp=7),
        "audience an object": iss.token(admin, aud={"safehold-api": 1}, azp=None),
        "no exp": jwt.encode({k: v for k, v in iss.claims(
            resource_access={"safehold": {"roles": admin}}).items() if k != "exp"},
            iss.keys["k1"], algorithm="RS256", headers={"kid": "k1"}),
    }


def _hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    import hashlib
    import hmac

    header = b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    body = b64(claims)
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def _with_new_key(iss: Issuer, kid: str, roles: list[str]) -> str:
    iss.keys[kid] = Issuer.new_key()  # signed, but never published
    return iss.token(roles, kid=kid)


ROUTES_TO_PROBE = [
    ("GET", "/api/v1/targets"),
    ("POST", "/api/v1/targets/main/backups"),
    ("DELETE", f"/api/v1/targets/main/backups/{BACKUP}"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES_TO_PROBE)
async def test_bad_tokens_are_refused(client: Any, issuer: Issuer, method: str,
                                      path: str) -> None:
    """Every kind of bad token gets 401 invalid_token with WWW-Authenticate: Bearer."""
    resp = await client.request(method, path)
    assert await status_and_code(resp) == (401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.request(method, path, headers={"Authorization": "Basic dTpw"})
    assert (await status_and_code(resp))[0] == 401
    for name, tok in bad_tokens(issuer).items():
        resp = await client.request(method, path, headers=auth(tok))
        assert await status_and_code(resp) == (401, "invalid_token"), name
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"], name


async def test_error_messages_say_why(client: Any, issuer: Issuer) -> None:
    """The 401 message names the reason (expired, issuer, audience, algorithm…)."""
    toks = bad_tokens(issuer)
    expect = {"expired": "expired", "not yet valid": "not valid yet",
              "wrong issuer": "another issuer", "wrong audience and azp": "audience",
              "alg none": "not accepted", "HS256 signed with the public key": "not accepted",
              "tampered payload": "signature", "unknown kid": "unknown key"}
    for name, needle in expect.items():
        resp = await client.get("/api/v1/targets", headers=auth(toks[name]))
        assert needle in (await resp.json())["error"]["message"], name


async def test_roles_viewer_operator_admin(client: Any, issuer: Issuer) -> None:
    """viewer reads, operator also backs up, admin also deletes; 403 names what is missing."""
    viewer, operator, admin = (issuer.token([r]) for r in ("viewer", "operator", "admin"))
    assert (await client.get("/api/v1/targets", headers=auth(viewer))).status == 200
    resp = await client.post("/api/v1/targets/main/backups", headers=auth(viewer))
    assert await status_and_code(resp) == (403, "forbidden")
    assert "operator" in (await resp.json())["error"]["message"]
    resp = await client.post("/api/v1/targets/main/backups", headers=auth(operator))
    assert resp.status == 202
    resp = await client.delete(f"/api/v1/targets/main/backups/{BACKUP}", headers=auth(operator))
    assert resp.status == 403
    resp = await client.delete(f"/api/v1/targets/main/backups/{BACKUP}", headers=auth(admin))
    assert await status_and_code(resp) == (404, "backup_not_found")


async def test_realm_roles_and_audience_also_count(client: Any, issuer: Issuer) -> None:
    """Roles from realm_access.roles work, and a token whose aud names us passes without azp."""
    tok = issuer.token(aud="safehold-api", azp="some-other-client",
                       realm_access={"roles": ["operator"]})
    assert (await client.post("/api/v1/targets/main/backups", headers=auth(tok))).status == 202


async def test_target_scoped_roles(client: Any, issuer: Issuer) -> None:
    """`operator:main` acts on main only; other targets are hidden and refused."""
    tok = issuer.token(["operator:main"])
    body = await (await client.get("/api/v1/targets", headers=auth(tok))).json()
    assert [t["id"] for t in body["targets"]] == ["main"]
    assert (await client.post("/api/v1/targets/main/backups", headers=auth(tok))).status == 202
    resp = await client.post("/api/v1/targets/other/backups", headers=auth(tok))
    assert resp.status == 403
    resp = await client.get("/api/v1/jobs?target=other", headers=auth(tok))
    assert resp.status == 403


async def test_group_claim_limits_global_roles(aiohttp_client: Any, oidc_settings: Settings,
                                               issuer: Issuer, redis: Any) -> None:
    """With auth.target_claim, a global role applies only to the targets the claim lists."""
    s = replace(oidc_settings, auth=replace(oidc_settings.auth, target_claim="groups"))
    c = await aiohttp_client(create_app(s))
    tok = issuer.token(["admin"], groups=["/safehold/other"])
    assert (await c.post("/api/v1/targets/main/backups", headers=auth(tok))).status == 403
    resp = await c.get("/api/v1/targets/other/backups", headers=auth(tok))
    assert resp.status == 200


async def test_jobs_of_other_targets_are_hidden(client: Any, issuer: Issuer) -> None:
    """A token scoped to one target neither lists nor reads another target's jobs."""
    admin = issuer.token(["admin"])
    other_job = (await (await client.post("/api/v1/targets/other/backups",
                                          headers=auth(admin))).json())["id"]
    tok = issuer.token(["viewer:main"])
    body = await (await client.get("/api/v1/jobs", headers=auth(tok))).json()
    assert other_job not in [j["id"] for j in body["jobs"]]
    resp = await client.get(f"/api/v1/jobs/{other_job}", headers=auth(tok))
    # not even a 403 naming the other target (issue 20): to this token it does not exist
    assert resp.status == 404 and "other" not in await resp.text()
    for path in (f"/api/v1/jobs/{other_job}/events",):
        resp = await client.get(path, headers=auth(tok))
        assert resp.status == 404, path
    resp = await client.delete(f"/api/v1/jobs/{other_job}", headers=auth(tok))
    assert resp.status in (403, 404) and "other" not in await resp.text()
    op = issuer.token(["operator:main"])
    resp = await client.delete(f"/api/v1/jobs/{other_job}", headers=auth(op))
    assert resp.status == 404 and "other" not in await resp.text()


async def test_key_rotation_refreshes_once(client: Any, issuer: Issuer) -> None:
    """An unknown kid triggers one JWKS refresh (single flight, cooldown), then verifies."""
    assert (await client.get("/api/v1/targets", headers=auth(issuer.token(["viewer"])))
            ).status == 200
    hits = issuer.jwks_hits
    issuer.keys["k2"] = Issuer.new_key()
    new = issuer.token(["viewer"], kid="k2")
    resp = await client.get("/api/v1/targets", headers=auth(new))
    assert resp.status == 401  # not published yet
    issuer.published = ["k1", "k2"]
    resp = await client.get("/api/v1/targets", headers=auth(new))
    assert resp.status == 401  # within the cooldown: no new fetch
    await asyncio.sleep(2.1)
    resps = await asyncio.gather(*[client.get("/api/v1/targets", headers=auth(new))
                                   for _ in range(8)])
    assert [r.status for r in resps] == [200] * 8
    # both misses fell within the cooldown of the first fetch; after it, 8 concurrent
    # requests share one fetch
    assert issuer.jwks_hits == hits + 1


def _fill(path: str) -> str:
    return (path.replace("{target}", "main").replace("{file}", BACKUP)
            .replace("{job_id}", "no-such-job").replace("{filename}", BACKUP)
            .replace("{table}", "public.t"))


async def test_role_matrix_over_the_route_table(client: Any, issuer: Issuer) -> None:
    """Every route: no token → 401 (unless public); one role too low → 403; its role → neither."""
    below = {Role.VIEWER: [], Role.OPERATOR: ["viewer"], Role.ADMIN: ["operator"]}
    names = {Role.VIEWER: "viewer", Role.OPERATOR: "operator", Role.ADMIN: "admin"}
    for r in ROUTES:
        path = _fill(r.path)
        resp = await client.request(r.method, path)
        if r.role is Role.PUBLIC:
            assert resp.status not in (401, 403), r.path
            resp.close()
            continue
        assert resp.status == 401, (r.method, r.path)
        low = issuer.token(below[r.role])
        resp = await client.request(r.method, path, headers=auth(low))
        assert resp.status == 403, (r.method, r.path)
        ok = issuer.token([names[r.role]])
        resp = await client.request(r.method, path, headers=auth(ok))
        assert resp.status not in (401, 403), (r.method, r.path, resp.status)
        resp.close()


async def test_dev_mode_token_works_and_jwks_is_served(anon: Any, settings: Settings) -> None:
    """Without an issuer, `safehold token`'s key verifies and its JWKS is public."""
    from tests.conftest import bearer

    jwks = await (await anon.get("/.well-known/jwks.json")).json()
    assert jwks["keys"][0]["kty"] == "RSA" and "d" not in jwks["keys"][0]
    resp = await anon.get("/api/v1/targets", headers=bearer(settings, "viewer"))
    assert resp.status == 200
    resp = await anon.post("/api/v1/targets/main/backups", headers=bearer(settings, "viewer"))
    assert resp.status == 403


def test_dev_mode_refuses_a_network_bind(settings: Settings) -> None:
    """Dev mode on a non-loopback address is refused unless forced."""
    exposed = replace(settings, server=replace(settings.server, host="0.0.0.0"))
    with pytest.raises(ConfigError, match="dev_allow_network"):
        check_dev_bind(exposed)
    check_dev_bind(replace(exposed, auth=replace(exposed.auth, dev_allow_network=True)))
    check_dev_bind(settings)


async def test_issuer_down_is_503_not_401(aiohttp_client: Any, oidc_settings: Settings,
                                          issuer: Issuer, redis: Any) -> None:
    """When the JWKS cannot be fetched, the answer says so (503), not 'bad token'."""
    down = replace(oidc_settings, auth=replace(oidc_settings.auth,
                                               jwks_url="http://127.0.0.1:9/certs"))
    c = await aiohttp_client(create_app(down))
    resp = await c.get("/api/v1/targets", headers=auth(issuer.token(["viewer"])))
    assert await status_and_code(resp) == (503, "jwks_unavailable")


async def test_a_remembered_token_still_ends_at_its_exp(
        aiohttp_client: Any, oidc_settings: Settings, issuer: Issuer, redis: Any) -> None:
    """Verified tokens are remembered (one signature check a minute), never past `exp`."""
    settings = replace(oidc_settings, auth=replace(oidc_settings.auth, leeway=0))
    client = await aiohttp_client(create_app(settings))
    now = int(time.time())
    token = issuer.token(["viewer"], exp=now + 2)
    for _ in range(3):
        assert (await client.get("/api/v1/targets", headers=auth(token))).status == 200
    await asyncio.sleep(now + 2.3 - time.time())
    resp = await client.get("/api/v1/targets", headers=auth(token))
    assert await status_and_code(resp) == (401, "invalid_token")
