"""OpenAPI 3.1 document generated from the route table: every parameter typed, every
request body and every answer (success and error) with its schema."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aiohttp import web

from api.context import ROUTE_TABLE
from api.schemas import ERROR, PATH_PARAMS, STR, Schema

if TYPE_CHECKING:  # api.routes serves this document
    from api.routes import Answer, Route

_UPLOAD_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
_ERRORS = {
    "400": "bad request (the code says what)", "401": "no or invalid bearer token",
    "403": "the token's role does not allow this", "404": "no such target, backup or job",
    "409": "conflict (e.g. an Idempotency-Key reused with another request)",
    "413": "too large", "429": "too many concurrent requests of this subject",
    "503": "Redis or the workers are unavailable (the code says which)",
    "507": "a destination is full",
}


def _answer(a: Answer) -> Schema:
    if a.schema is None and a.media == ("application/json",):
        return {"description": a.description}
    return {"description": a.description,
            "content": {m: ({"schema": a.schema} if a.schema is not None else {})
                        for m in a.media}}


def operation(r: Route) -> Schema:
    path_schemas = {**PATH_PARAMS, **r.path_params}
    error = {"content": {"application/json": {"schema": ERROR}}}
    op: Schema = {
        "summary": r.summary,
        "operationId": r.handler.__name__,
        "x-required-role": r.role.name.lower(),
        "parameters": [
            {"name": p, "in": "path", "required": True, "schema": path_schemas.get(p, STR)}
            for p in re.findall(r"{(\w+)}", r.path)
        ] + [
            {"name": q, "in": "query", "required": False, "description": d, "schema": schema}
            for q, (d, schema) in r.query.items()
        ],
        "responses": {
            **{code: _answer(a) for code, a in (r.responses or {}).items()},
            **{code: {"description": d, **error} for code, d in _ERRORS.items()},
            "default": {"description": "error", **error},
        },
    }
    if r.role.name != "PUBLIC":
        op["security"] = [{"bearer": []}]
    if r.upload:
        op["requestBody"] = _UPLOAD_BODY
    elif r.body:
        # a body that must name something (required fields, or one of several) is itself
        # required: an empty POST is refused (400), as the spec then says
        op["requestBody"] = {"required": bool(r.body.get("required") or r.body.get("oneOf")),
                             "content": {"application/json": {"schema": r.body}}}
    if r.idempotent:
        op["parameters"].append({
            "name": "Idempotency-Key", "in": "header", "required": False,
            "description": "the same key from the same subject: the same job, not another",
            "schema": {"type": "string", "maxLength": 200}})  # "": no key
    return op


def build(routes: list[Route]) -> Schema:
    paths: dict[str, Schema] = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = operation(r)
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
