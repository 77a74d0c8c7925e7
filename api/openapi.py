"""OpenAPI 3.1 document generated from the route table."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from api.context import ROUTE_TABLE

ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}


def build(routes: list[Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "x-required-role": r.role.name.lower(),
            "parameters": [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in re.findall(r"{(\w+)}", r.path)
            ] + [
                {"name": q, "in": "query", "required": False, "description": d,
                 "schema": {"type": "string"}}
                for q, d in r.query.items()
            ],
            "responses": {
                **{code: {"description": d} for code, d in (r.responses or {
                    "200": "OK"}).items()},
                "default": {"description": "error",
                            "content": {"application/json": {"schema": ERROR_SCHEMA}}},
            },
        }
        if r.role.name != "PUBLIC":
            op["security"] = [{"bearer": []}]
        if r.body:
            op["requestBody"] = {"required": False,
                                 "content": {"application/json": {"schema": r.body}}}
        if r.method == "POST":
            op["parameters"].append({"name": "Idempotency-Key", "in": "header",
                                     "required": False, "schema": {"type": "string"}})
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Safehold", "version": "1",
                 "description": "Backup and restore service for databases. Every operation "
                                "is a job: submit, then poll /api/v1/jobs/{id} or follow its "
                                "server-sent events."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "bearerFormat": "JWT"}}},
        "paths": paths,
    }


async def openapi(request: web.Request) -> web.Response:
    """The document of the routes this app serves (its own table: no import of routes)."""
    routes = {id(r): r for r in request.app[ROUTE_TABLE].values()}  # HEAD twins: once
    return web.json_response(build(list(routes.values())))
