"""REST v1 surface: bad inputs, listing, download, delete, idempotency, health, OpenAPI."""

from __future__ import annotations

from api.roles import Role
from api.routes import ROUTES


def test_every_route_declares_a_role() -> None:
    """No route is added without a role; only health checks, metrics, the dev JWKS, the
    API's own documentation, the web page's static files and its SSO login are public."""
    for r in ROUTES:
        assert isinstance(r.role, Role)
    assert {r.path for r in ROUTES if r.role is Role.PUBLIC} == {
        "/healthz", "/readyz", "/.well-known/jwks.json", "/metrics", "/api/v1/openapi.json",
        "/docs", "/docs/{file}", "/", "/static/{file}", "/api/v1/login-config",
        "/api/v1/login/token"}


