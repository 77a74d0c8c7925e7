"""HTTP helpers every surface shares: the request's services, principal and caller (with
the surface it came through), bodies and query values read strictly (400 with the name at
fault), and jobs as a reader may see them."""

from __future__ import annotations

import json
import re

from aiohttp import web

from api.auth import Principal
from api.context import PRINCIPAL, REQUEST_ID, ROUTE_TABLE, SERVICES, Services
from api.operations import MAX_WAIT, Caller, Operations
from api.roles import Role
from api.schemas import EVENT_ID, JOB_ID, Body, Schema
from shared import CLI_AGENT
from shared.errors import BadRequest
from shared.jobs import Job, JobKind

CALLER = web.RequestKey("caller", Caller)


def svc(request: web.Request) -> Services:
    return request.app[SERVICES]


def job_view(job: Job, reader: Principal | None = None) -> dict[str, object]:
    d = for_reader(job.to_dict(), reader, job.kind, job.target)
    d["links"] = {"self": f"/api/v1/jobs/{job.id}", "events": f"/api/v1/jobs/{job.id}/events"}
    return d


_QUOTED_PATH = re.compile(r"""(['"])/[^'"\n]*\1""")


def hide_paths(text: str) -> str:
    """Server file paths (as OSError quotes them) out of what non-admins read."""
    return _QUOTED_PATH.sub(r"\1<server path>\1", text)


def for_reader(doc: dict[str, object], reader: Principal | None, kind: str,
               target: str) -> dict[str, object]:
    """A restore's error quotes what the restored file made the database say (user SQL can
    echo anything it reads): only operators and admins of the target see that text. Below
    admin, server file paths in any job's error are hidden."""
    result = doc.get("result")
    if reader is not None and kind == JobKind.PREVIEW and \
            reader.role_for(target) < Role.OPERATOR:  # rows of a backup: operators only
        params = doc.get("params")
        doc = {**doc, "result": {k: v for k, v in result.items() if k not in (
            "rows", "columns", "where")} if isinstance(result, dict) else result,
            "params": {k: v for k, v in params.items() if k != "where"}
            if isinstance(params, dict) else params}
    if reader is not None and kind == JobKind.STATS and reader.role_for(target) < Role.ADMIN and \
            isinstance(result, dict) and "path" in result:
        doc = {**doc, "result": {k: v for k, v in result.items() if k != "path"}}
    error = doc.get("error")
    if reader is not None and isinstance(error, dict) and \
            reader.role_for(target) < Role.ADMIN and isinstance(error.get("message"), str):
        error = {**error, "message": hide_paths(error["message"])}
        doc = {**doc, "error": error}
    if (reader is None or kind != JobKind.RESTORE or not isinstance(error, dict)
            or reader.role_for(target) >= Role.OPERATOR):
        return doc
    shown = {k: v for k, v in error.items() if k != "message"}
    shown["message"] = (f"the restore failed ({error.get('code')}); database "
                        f"{error.get('database_state', 'unknown')}. The details are shown to "
                        "operators and admins of this target")
    return {**doc, "error": shown}


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


async def json_body(request: web.Request) -> object:
    """The request's JSON (400 for anything else, a 100,000-deep nesting included)."""
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None


def declared_body(request: web.Request) -> Schema | None:
    """The JSON schema the request's route declares for its body (api.routes `Route.body`,
    the same declaration the OpenAPI document shows)."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    route = request.app[ROUTE_TABLE].get((request.method, resource.canonical))
    body = getattr(route, "body", None)
    return body if isinstance(body, dict) else None


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "boolean": (bool,), "object": (dict,), "array": (list,),
    "integer": (int,), "number": (int, float)}


def _field_problem(value: object, schema: Schema) -> str | None:
    """Why `value` does not fit `schema` (the keywords the route table uses), or None.
    A `pattern` is left to the grammar it comes from (a backup name's is naming.parse,
    whose error names what is wrong), checked by the operation."""
    kind = schema.get("type")
    if kind is not None:
        if not isinstance(value, _JSON_TYPES[kind]) or \
                kind in ("integer", "number") and isinstance(value, bool):
            return "has the wrong type"
    if "enum" in schema and value not in schema["enum"]:
        return "must be one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema and value != schema["const"]:
        return f"must be {json.dumps(schema['const'])}"
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            return f"is longer than {schema['maxLength']} characters"
        if len(value) < schema.get("minLength", 0):
            return f"is shorter than {schema['minLength']} characters"
    if isinstance(value, dict):
        if len(value) > schema.get("maxProperties", len(value)):
            return f"has more than {schema['maxProperties']} entries"
        inner = schema.get("additionalProperties")
        if isinstance(inner, dict):
            for v in value.values():
                if (why := _field_problem(v, inner)) is not None:
                    return f"holds a value that {why}"
    return None


async def read_json(request: web.Request) -> Body:
    """A JSON object body (or no body at all), checked against the route's declared schema:
    no field it does not declare, each of the declared type and form, the required ones
    present. What the schema cannot say (which engine an option fits) is the operation's."""
    schema = declared_body(request) or {"properties": {}}
    fields: dict[str, Schema] = schema.get("properties", {})
    body = await json_body(request) if request.can_read_body else {}
    if not isinstance(body, dict):  # `null` too: a body, when sent, is an object
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    unknown = set(body) - set(fields)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}",
                         code="invalid_body")
    for key in schema.get("required", []):
        if key not in body:
            raise BadRequest(f"field '{key}' is required", code="invalid_body")
    for key, value in body.items():
        if (why := _field_problem(value, fields[key])) is not None:
            raise BadRequest(f"field '{key}' {why}", code="invalid_body")
    return body


def query_float(request: web.Request, name: str, lo: float, hi: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter '{name}' must be a number", code="invalid_query") \
            from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter '{name}' must be between {lo:g} and {hi:g}",
                         code="invalid_query")
    return value


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"query parameter '{name}' must be true or false", code="invalid_query")


WEB_CLIENT = "web"  # the page's X-Safehold-Client header


def rest_surface(request: web.Request) -> str:
    """Which surface a request came through, for the audit's "via" (informational: who
    acted is the token's subject): MCP, the seed surface, the CLI, the web page, or any
    other HTTP client (curl, a script)."""
    if request.path == "/mcp":
        return "mcp"
    if request.path.startswith("/backup/"):
        return "seed"
    if request.headers.get("User-Agent", "").startswith(CLI_AGENT):
        return "cli"
    if request.headers.get("X-Safehold-Client") == WEB_CLIENT:
        return "web"
    return "rest"


def caller(request: web.Request, surface: str = "rest") -> Caller:
    """This request as an operations caller (one per request: it carries the audit mark
    and the warnings the answer shows)."""
    c = request.get(CALLER)
    if c is None:
        if surface == "rest":
            surface = rest_surface(request)
        c = Caller(request[PRINCIPAL], surface, request.get(REQUEST_ID), request.remote,
                   request.method, request.path)
        request[CALLER] = c
    return c


def ops(request: web.Request) -> Operations:
    return Operations(svc(request))


MAX_IDEMPOTENCY_KEY = 200


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters",
                         code="invalid_header")
    return key


def wait_param(request: web.Request) -> float | None:
    return query_float(request, "wait", 0, MAX_WAIT)


def job_response(job: Job, request: web.Request | None = None) -> web.Response:
    view = job_view(job, request.get(PRINCIPAL) if request is not None else None)
    c = request.get(CALLER) if request is not None else None
    if c is not None and c.warnings and not job.terminal:
        view["warnings"] = list(c.warnings)
    return web.json_response(view, status=200 if job.terminal else 202,
                             headers={"Location": f"/api/v1/jobs/{job.id}"})


async def live_workers(s: Services) -> int:
    return await Operations(s).live_workers()


JOB_ID_RE = re.compile(JOB_ID["pattern"])
EVENT_ID_RE = re.compile(EVENT_ID["pattern"])


def cursor(request: web.Request, grammar: re.Pattern[str], what: str) -> str | None:
    """A paging cursor (`before`) from the query, in its grammar, else 400."""
    value = request.query.get("before")
    if value is not None and not grammar.fullmatch(value):
        raise BadRequest(f"query parameter 'before' must be {what} (the previous page's "
                         "next_before)", code="invalid_query")
    return value
