"""Issue 20 weak spots in the page's SSO login (`POST /api/v1/login/token`): code
exchanges are bounded and kept apart from signing-key refreshes, the provider's answers
are read to a limit, the redirect URI is never built from the Host header, and the
provider's endpoints must be on the issuer's origin (and are looked up again hourly)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from aiohttp import web

from api.app import create_app
from api.context import LOGIN_EXCHANGES
from shared.config import AuthSettings, Settings
from tests.helpers import wait_for
from tests.servers.test_auth import ISSUER_PATH, Issuer, auth

PAGE = "https://backups.example.org"


class Provider:
    """A fake identity provider whose token endpoint can hang or flood."""

    def __init__(self) -> None:
        self.issuer = Issuer()
        self.mode = "ok"
        self.token_endpoint = ""
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def discovery(_: web.Request) -> web.Response:
            base = self.issuer.url + ISSUER_PATH
            return web.json_response({"issuer": base, "authorization_endpoint": base + "/a",
                                      "token_endpoint": self.token_endpoint or base + "/t"})

        async def token(_: web.Request) -> web.StreamResponse:
            if self.mode == "hang":
                await self.release.wait()
            if self.mode == "flood":
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                await resp.prepare(_)
                await resp.write(b'{"access_token": "')
                for _i in range(100):
                    await resp.write(b"A" * (1 << 20))
                return resp
            # the answer in two writes a moment apart, as over a real network
            body = json.dumps({"access_token": self.issuer.token(
                roles=["admin"], aud="safehold-api", azp="safehold-web")}).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(_)
            await resp.write(body[:20])
            await asyncio.sleep(0.2)
            await resp.write(body[20:])
            return resp

        async def certs(_: web.Request) -> web.Response:
            return web.json_response(self.issuer.jwks())

        app = web.Application()
        app.router.add_get(f"{ISSUER_PATH}/.well-known/openid-configuration", discovery)
        app.router.add_post(f"{ISSUER_PATH}/t", token)
        app.router.add_get(f"{ISSUER_PATH}/protocol/openid-connect/certs", certs)
        return app


async def setup(aiohttp_server: Any, aiohttp_client: Any, settings: Settings,
                public_url: str = PAGE, origins: str = "",
                provider: Provider | None = None) -> tuple[Provider, Any]:
    import api.surfaces.web

    api.surfaces.web._DISCOVERY.clear()
    p = provider or Provider()
    if provider is None:
        srv = await aiohttp_server(p.app())
        p.issuer.url = str(srv.make_url("")).rstrip("/")
    sso = replace(settings, auth=AuthSettings(
        issuer=p.issuer.url + ISSUER_PATH, audience="safehold-api",
        allowed_azp="safehold-web", client_id="safehold", web_client_id="safehold-web",
        idp_endpoint_origins=origins),
        server=replace(settings.server, public_url=public_url))
    return p, await aiohttp_client(create_app(sso))


def login(redirect: str = PAGE + "/") -> dict[str, str]:
    return {"code": "c", "code_verifier": "v", "redirect_uri": redirect}


async def test_a_login_works_and_the_redirect_uri_is_the_configured_page(
        aiohttp_server: Any, aiohttp_client: Any, settings: Settings, redis: Any) -> None:
    _, api = await setup(aiohttp_server, aiohttp_client, settings)
    resp = await api.post("/api/v1/login/token", json=login())
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["access_token"]
    evil = await api.post("/api/v1/login/token", json=login("https://evil.example/"),
                          headers={"Host": "evil.example"})
    assert evil.status == 400 and PAGE in (await evil.json())["error"]["message"]


async def test_without_public_url_sso_is_off_not_host_header_trusting(
        aiohttp_server: Any, aiohttp_client: Any, settings: Settings, redis: Any) -> None:
    _, api = await setup(aiohttp_server, aiohttp_client, settings, public_url="")
    host = "evil.example"
    resp = await api.post("/api/v1/login/token", json=login(f"http://{host}/"),
                          headers={"Host": host})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "sso_disabled"
    assert "public_url" in (await resp.json())["error"]["message"]
    config = await (await api.get("/api/v1/login-config")).json()
    assert config["oidc"] is None and "public_url" in config["sso_unavailable"]


async def test_hanging_provider_bounds_logins_and_spares_key_refreshes(
        aiohttp_server: Any, aiohttp_client: Any, settings: Settings, redis: Any) -> None:
    """150 exchanges against a token endpoint that never answers: 8 wait (their own
    connections), the rest are 429 at once; meanwhile a token signed with a new key still
    verifies (its JWKS refresh is not stuck behind the logins)."""
    p, api = await setup(aiohttp_server, aiohttp_client, settings)
    p.mode = "hang"
    tries = [asyncio.ensure_future(api.post("/api/v1/login/token", json=login()))
             for _ in range(150)]
    # the extra ones are answered without waiting for the provider (which never answers)
    await wait_for(lambda: sum(t.done() for t in tries) >= 150 - LOGIN_EXCHANGES, 30,
                   "the exchanges beyond the bound to be refused")
    await asyncio.sleep(0.5)  # and no more than those: the bounded ones are still waiting
    done = [t for t in tries if t.done()]
    assert len(done) == 150 - LOGIN_EXCHANGES, len(done)
    codes = {(await t.result().json())["error"]["code"] for t in done}
    assert codes == {"too_many_logins"} and done[0].result().headers["Retry-After"] == "2"
    p.issuer.keys["k2"] = Issuer.new_key()
    p.issuer.published.append("k2")
    fresh = p.issuer.token(["viewer"], kid="k2", aud="safehold-api", azp="safehold-web")
    resp = await asyncio.wait_for(api.get("/api/v1/targets", headers=auth(fresh)), 5)
    assert resp.status == 200, await resp.text()
    p.release.set()
    answers = await asyncio.gather(*tries)
    assert sum(1 for a in answers if a.status == 200) == LOGIN_EXCHANGES


async def test_a_flooding_token_endpoint_is_cut_off(
        aiohttp_server: Any, aiohttp_client: Any, settings: Settings, redis: Any) -> None:
    p, api = await setup(aiohttp_server, aiohttp_client, settings)
    p.mode = "flood"
    resp = await api.post("/api/v1/login/token", json=login())
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "idp_unreachable"


async def test_a_token_endpoint_off_the_issuers_origin_is_refused(
        aiohttp_server: Any, aiohttp_client: Any, settings: Settings, redis: Any) -> None:
    p, api = await setup(aiohttp_server, aiohttp_client, settings)
    p.token_endpoint = "https://collector.example/steal"
    resp = await api.post("/api/v1/login/token", json=login())
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["code"] == "idp_misconfigured" and "origin" in body["error"]["message"]


async def test_endpoint_origins_allowed_by_config_and_default_ports(
        aiohttp_server: Any, aiohttp_client: Any, settings: Settings, redis: Any) -> None:
    """An explicit default port is the same origin; a provider whose token endpoint lives
    elsewhere (Google's) is allowed by `auth.idp_endpoint_origins`."""
    from api.surfaces.web import _origin

    assert _origin("https://sso.example.com:443/t") == _origin("https://sso.example.com/r")
    for origins, status in (("", 503), ("http://localhost:{port}", 200)):
        p, api = await setup(aiohttp_server, aiohttp_client, settings)
        other = await aiohttp_server(p.app())  # the same provider on another origin
        p.token_endpoint = f"http://localhost:{other.port}{ISSUER_PATH}/t"
        if origins:
            p, api = await setup(aiohttp_server, aiohttp_client, settings,
                                 origins=origins.format(port=other.port), provider=p)
        resp = await api.post("/api/v1/login/token", json=login())
        assert resp.status == status, await resp.text()
