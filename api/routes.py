"""The route table: every route declares the role it needs (or PUBLIC)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from api.context import ROUTE_TABLE
from api.docs import docs_file, docs_index
from api.openapi import openapi
from api.preview import preview_rows
from api.roles import Role
from api.schemas import (
    AUDIT,
    BACKUP_NAME,
    BACKUPS,
    BOOL,
    CONTENTS,
    DELETED,
    DESTINATIONS,
    DOWNLOAD_PATH,
    EVENT_ID,
    HEALTH,
    JOB,
    JOB_ID,
    JOB_KIND,
    JOB_STATUS,
    JOBS,
    JWKS,
    LIMIT,
    LOGIN_CONFIG,
    LOGIN_TOKEN,
    MANIFEST,
    OPENAPI,
    PREVIEW,
    READY,
    RECOVERY_WINDOW,
    RETENTION,
    SCHEDULES,
    SEED_CREATED,
    SEED_DATABASE,
    SEED_DELETED,
    SEED_LIST,
    SEED_RESTORED,
    STATS,
    STR,
    TARGET_ID,
    TARGETS,
    TICKET,
    TIME,
    WAIT,
    WHOAMI,
    Schema,
    obj,
)
from api.surfaces import rest as h
from api.surfaces import seed
from api.surfaces import web as page
from api.surfaces.events import all_events, job_events
from api.surfaces.mcp import mcp_endpoint
from api.surfaces.metrics import metrics
from api.surfaces.uploads import upload_backup
from shared.engines import ENGINES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Param = tuple[str, Schema]  # (description, JSON schema of the value)


@dataclass(frozen=True)
class Answer:
    """One documented response: a JSON body of `schema`, or a body of another media type."""

    description: str
    schema: Schema | None = None
    media: tuple[str, ...] = ("application/json",)


def ok(schema: Schema, description: str = "OK") -> dict[str, Answer]:
    return {"200": Answer(description, schema)}


# a backup's bytes: its content type follows the last codec of its chain
BACKUP_BYTES = Answer("the backup's bytes (a Range request: 206 with the part)", media=(
    "application/gzip", "application/zstd", "application/octet-stream"))


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: Role
    summary: str
    query: dict[str, Param] = field(default_factory=dict)
    body: dict[str, Any] | None = None  # JSON schema of the request body
    responses: dict[str, Answer] = field(default_factory=dict)  # status -> answer (2xx/3xx)
    path_params: dict[str, Schema] = field(default_factory=dict)  # beyond PATH_PARAMS
    target_from_query: bool = False  # seed routes: `?database=<target>` or the default
    ticket: bool = False  # also reachable with a one-use `?ticket=` (browser downloads)
    audit: bool = True  # False: the handler audits each call itself (MCP tools)
    upload: bool = False  # the body is a backup file (multipart field `file`, or raw)
    idempotent: bool = False  # honours Idempotency-Key (the same key: the same job)


T = "/api/v1/targets/{target}"
# a table as a restore or a preview names it: PostgreSQL schema.table, MySQL/SQLite table,
# MongoDB db.collection (which form a target takes is checked against its engine: 422)
TABLE_NAME = {"type": "string", "maxLength": 191,
              "pattern": "^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\\.[A-Za-z0-9_][A-Za-z0-9_.-]{0,119})?$"}
WHERE_PATTERN = "^[A-Za-z_][A-Za-z0-9_$]{0,62}=[^\\u0000]{0,1000}$"
# a Redis stream id (milliseconds-sequence); 19 digits a part always fit Redis's 64 bits
_BACKUP_BODY = {"type": "object", "additionalProperties": False, "properties": {
    "compress": {"type": "boolean", "default": True,
                 "description": "false: no compression (else the target's gzip or zstd)"},
    "note": {"type": "string", "maxLength": 500},
    "format": {"enum": list(ENGINES["redis"].formats),
               "description": "redis only: `resp` (default) or `rdb`"},
    "use_apoc": {"type": "boolean", "description": "neo4j only: export with APOC"}}}
IDENTITY = {"type": "string", "maxLength": 65536,
            "description": "age identity for an encrypted backup (AGE-SECRET-KEY-… lines or "
            "an unencrypted SSH private key; 422 invalid_identity if none can be read); "
            "sealed to the live workers, never stored"}
_RESTORE_BODY = {"type": "object", "additionalProperties": False,
                 # a backup, or (PITR targets) an instant of the recovery window
                 "oneOf": [{"required": ["backup"]}, {"required": ["point_in_time"]}],
                 # owner_map goes with roles = "map", and roles = "map" needs one
                 "dependentRequired": {"owner_map": ["roles"], "replace": ["into_database"]},
                 "if": {"required": ["roles"], "properties": {"roles": {"const": "map"}}},
                 "then": {"required": ["owner_map"]},
                 "else": {"not": {"required": ["owner_map"]}},
                 "properties": {"backup": BACKUP_NAME,
                                "point_in_time": {"type": "string", "maxLength": 220},
                                "into_database": {
                                    "type": "string",
                                    "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
                                    "maxLength": 118, "description": "restore into this new "
                                    "database beside the live one (PostgreSQL, MySQL: a "
                                    "database name; SQLite: a file name next to the "
                                    "target's)"},
                                "into_target": {
                                    "type": "string", "maxLength": 64,
                                    "pattern": "^[A-Za-z0-9_-]+$",
                                    "description": "restore into this other target of the "
                                    "same engine (its credentials, lock, safety backup); "
                                    "operator on both"},
                                "keys": {
                                    "type": "array", "minItems": 1, "maxItems": 100,
                                    "items": {"type": "string", "minLength": 1,
                                              "maxLength": 512,
                                              "pattern": "^[^\\u0000\\r\\n]+$"},
                                    "description": "Redis: only the keys these glob "
                                    "patterns match (e.g. session:*); every other key is "
                                    "left as it is"},
                                "tables": {
                                    "type": "array", "minItems": 1, "maxItems": 100,
                                    "uniqueItems": True, "items": TABLE_NAME,
                                    "description": "only these tables (PostgreSQL: "
                                    "schema.table); everything else is left as it is"},
                                "schemas": {
                                    "type": "array", "minItems": 1, "maxItems": 100,
                                    "uniqueItems": True,
                                    "items": {"type": "string", "maxLength": 63,
                                              "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                    "description": "PostgreSQL: every table the backup "
                                    "holds in these schemas (as tables restores them)"},
                                "replace": {"type": "boolean", "default": False,
                                            "description": "with into_database: restore "
                                            "over it when it exists"},
                                "create_safety_backup": {"type": "boolean", "default": True},
                                "owner_map": {
                                    "type": "object", "minProperties": 1,
                                    "maxProperties": 1000,
                                    "propertyNames": {"minLength": 1, "maxLength": 63,
                                                      "pattern": "^[^\\x00]+$"},
                                    "additionalProperties": {
                                        "type": "string", "minLength": 1, "maxLength": 63,
                                        "pattern": "^[^\\x00]+$"},
                                    "description": "with roles = map: {old role: new role}"},
                                "roles": {
                                    "enum": ["create", "skip", "map"],
                                    "description": "PostgreSQL, MySQL/MariaDB: roles or "
                                    "accounts the backup names that this server lacks are "
                                    "created (as the backup's globals describe them), "
                                    "mapped (PostgreSQL) or their owners and grants left "
                                    "out; without it such a restore is refused "
                                    "(roles_missing) before anything changes"},
                                "database": {
                                    "type": "string", "minLength": 1, "maxLength": 255,
                                    "description": "a server target's backup set: restore "
                                    "only this database of it (else every one)"},
                                "terminate_connections": {
                                    "type": "boolean", "default": False,
                                    "description": "PostgreSQL, MySQL/MariaDB: end the "
                                    "application's sessions on the database (those there "
                                    "at the start, and any that blocks the restore) "
                                    "instead of waiting for their locks"},
                                "identity": IDENTITY}}
_DB: dict[str, Param] = {"database": ("target id (default: the configured default_target)",
                                      SEED_DATABASE)}
_WAIT: dict[str, Param] = {
    "wait": ("seconds to wait for the job to finish (200 if it did, else 202)", WAIT)}
_JOB = {"202": Answer("job accepted (or still running after ?wait)", JOB),
        "200": Answer("job finished", JOB)}
_SAFETY: dict[str, Param] = {"create_safety_backup": ("default true", BOOL)}
_SEED_WAITING = Answer("still running after server.wait_timeout: follow the job",
                       obj({"success": BOOL, "job_id": JOB_ID, "status": JOB_STATUS}))
_SEED_RESTORE = {"200": Answer("restored", SEED_RESTORED), "202": _SEED_WAITING}
_FILE = {"file": STR}  # a bundled file's name (not a backup)

ROUTES: list[Route] = [
    Route("GET", "/healthz", h.healthz, Role.PUBLIC, "Process is up", responses=ok(HEALTH)),
    Route("GET", "/readyz", h.readyz, Role.PUBLIC,
          "Redis reachable and at least one live worker",
          responses=ok(READY, "ready")),  # not ready: 503 with checks and error
    Route("GET", "/metrics", metrics, Role.PUBLIC,
          "Prometheus metrics (public unless auth.public_metrics = false: then viewer)",
          responses={"200": Answer("Prometheus text format", media=("text/plain",))}),
    Route("GET", "/.well-known/jwks.json", h.jwks, Role.PUBLIC,
          "Dev mode only: the public key that verifies `safehold token` tokens",
          responses=ok(JWKS)),
    Route("GET", "/api/v1/openapi.json", openapi, Role.PUBLIC,
          "This document (public: it names routes, never targets or data)",
          responses=ok(OPENAPI)),
    Route("GET", "/docs", docs_index, Role.PUBLIC, "Interactive API documentation",
          responses={"200": Answer("HTML", media=("text/html",))}),
    Route("GET", "/docs/{file}", docs_file, Role.PUBLIC, "Swagger UI's files",
          path_params=_FILE, responses={"200": Answer("a file", media=(
              "text/css", "text/javascript", "image/png"))}),
    Route("GET", "/api/v1/targets", h.list_targets, Role.VIEWER, "Configured targets",
          responses=ok(TARGETS)),
    Route("GET", f"{T}/stats", h.target_stats, Role.VIEWER,
          "Database size, tables with row estimates, server version",
          responses={**ok(STATS), "202": Answer("still running: follow the job", JOB)}),
    Route("POST", f"{T}/backups", h.create_backup, Role.OPERATOR, "Start a backup job",
          query=_WAIT, body=_BACKUP_BODY, idempotent=True, responses=_JOB),
    Route("GET", f"{T}/retention", h.retention_preview, Role.VIEWER,
          "What the retention policy would delete now on each destination, and why the "
          "rest is kept (a plan: nothing is deleted, no job)", responses=ok(RETENTION)),
    Route("GET", f"{T}/recovery-window", h.recovery_window, Role.VIEWER,
          "Point-in-time recovery: the window a restore can reach (earliest, latest, how "
          "far the archive is behind, bases, gaps), read from the archive itself, and what "
          "its streamer is doing now", responses=ok(RECOVERY_WINDOW)),
    Route("GET", f"{T}/backups", h.list_backups, Role.VIEWER,
          "Backups (manifests), newest first; safety backups flagged", responses=ok(BACKUPS)),
    Route("GET", f"{T}/backups/{{file}}", h.get_backup, Role.VIEWER, "One backup's manifest",
          responses=ok(MANIFEST)),
    Route("GET", f"{T}/backups/{{file}}/contents", h.backup_contents, Role.VIEWER,
          "What a backup holds, as recorded when it was made: its tables (collections, key "
          "spaces) with their row counts, exact where the dump was counted as it passed; "
          "no byte of the backup is read", responses=ok(CONTENTS)),
    Route("GET", f"{T}/backups/{{file}}/contents/{{table}}", preview_rows, Role.OPERATOR,
          "Rows of one table read from the backup itself, nothing restored (PostgreSQL: "
          "schema.table, the stream read until `limit` rows match; SQLite). Audited: it "
          "shows data", path_params={"table": TABLE_NAME},
          query={"limit": ("rows at most, 1-500 (default 50)",
                           {"type": "integer", "minimum": 1, "maximum": 500}),
                 "where": ("column=value: only rows whose column reads value",
                           {"type": "string", "pattern": WHERE_PATTERN})},
          responses={**ok(PREVIEW), "202": Answer("still reading: follow the job", JOB)}),
    Route("GET", f"{T}/backups/{{file}}/download", h.download_backup, Role.OPERATOR,
          "Download a backup from the first destination holding it (supports Range; S3 "
          "destinations may redirect to a presigned URL). A browser passes `?ticket=` "
          "from POST /api/v1/tickets instead of the Authorization header",
          query={"ticket": ("one-use download ticket (60 s) instead of a bearer token", STR)},
          ticket=True, responses={"200": BACKUP_BYTES, "206": BACKUP_BYTES,
                                  "307": Answer("to a presigned URL of an S3 destination")}),
    Route("POST", "/api/v1/tickets", page.create_ticket, Role.VIEWER,
          "A one-use, 60-second ticket for one download path (for links in a browser, "
          "which cannot send Authorization); the roles are checked when it is used",
          body={"type": "object", "required": ["path"], "additionalProperties": False,
                "properties": {"path": DOWNLOAD_PATH}},
          responses=ok(TICKET)),
    Route("GET", "/api/v1/whoami", page.whoami, Role.VIEWER,
          "The token's subject, global role and role per visible target",
          responses=ok(WHOAMI)),
    Route("GET", "/", page.index, Role.PUBLIC, "The web page",
          responses={"200": Answer("HTML", media=("text/html",))}),
    Route("GET", "/api/v1/login-config", page.login_config, Role.PUBLIC,
          "How the web page logs in: SSO (authorization code + PKCE) or a pasted token",
          responses=ok(LOGIN_CONFIG)),
    Route("POST", "/api/v1/login/token", page.login_token, Role.PUBLIC,
          "SSO: exchange the page's authorization code and PKCE verifier for a token "
          "(404 sso_disabled where SSO is not configured)",
          body={"type": "object", "required": ["code", "code_verifier", "redirect_uri"],
                "properties": {"code": {"type": "string"},
                               "code_verifier": {"type": "string"},
                               "redirect_uri": {"type": "string"}}},
          responses=ok(LOGIN_TOKEN)),
    Route("GET", "/static/{file}", page.static, Role.PUBLIC, "The web page's files",
          path_params=_FILE, responses={"200": Answer("a file", media=(
              "text/css", "text/javascript"))}),
    Route("DELETE", f"{T}/backups/{{file}}", h.delete_backup, Role.ADMIN, "Delete a backup",
          responses=ok(DELETED)),
    Route("POST", f"{T}/uploads", upload_backup, Role.OPERATOR,
          "Upload a backup (multipart field `file`, or the raw body): streamed, size-capped, "
          "checksummed and validated before it is listed as upload_…", upload=True,
          query={"restore": ("true: restore it right after (a restore job)", BOOL),
                 **_SAFETY,
                 "wait": ("with restore=true: seconds to wait for the restore", WAIT)},
          responses={"201": Answer("stored", MANIFEST),
                     "202": Answer("stored, restore running", obj(
                         {"upload": MANIFEST, "job": JOB})),
                     "200": Answer("stored and restored", obj({"upload": MANIFEST,
                                                               "job": JOB}))}),
    Route("POST", f"{T}/restores", h.create_restore, Role.OPERATOR,
          "Start a restore job (verify, safety backup, clean restore, rollback on failure)",
          query=_WAIT, body=_RESTORE_BODY, idempotent=True, responses=_JOB),
    Route("GET", "/api/v1/jobs", h.list_jobs, Role.VIEWER, "Jobs, newest first",
          query={"target": ("filter by target", TARGET_ID),
                 "status": ("filter by status", JOB_STATUS),
                 "kind": ("filter by kind", JOB_KIND),
                 "limit": ("at most this many (default 100)", LIMIT),
                 "before": ("a job id: the jobs older than it (the answer's next_before "
                            "pages on)", JOB_ID)},
          responses=ok(JOBS)),
    Route("GET", "/api/v1/jobs/{job_id}", h.get_job, Role.VIEWER, "One job",
          responses=ok(JOB)),
    Route("DELETE", "/api/v1/jobs/{job_id}", h.cancel_job, Role.OPERATOR,
          "Cancel a job (queued: never starts; running backup: stops, keeps nothing)",
          responses={"200": Answer("cancelled (or already finished)", JOB),
                     "202": Answer("cancel requested: the worker stops it", JOB)}),
    Route("GET", "/api/v1/jobs/{job_id}/events", job_events, Role.VIEWER,
          "Server-sent events of a job (resumable with Last-Event-ID)",
          query={"last_event_id": ("resume after this event id (same as the header; "
                                   "400 invalid_last_event_id for anything else)", EVENT_ID)},
          responses={"200": Answer("an event stream", media=("text/event-stream",))}),
    Route("POST", f"{T}/prune", h.prune, Role.ADMIN,
          "Apply the target's retention policy now (a prune job, audited per deletion)",
          query={"dry_run": ("true: return the plan (keep/delete and why), delete nothing",
                             BOOL), **_WAIT}, idempotent=True, responses=_JOB),
    Route("POST", f"{T}/verify", h.verify, Role.OPERATOR,
          "Restore drill: restore the newest (or the given) backup into a scratch place, "
          "compare exact counts with the dump's, run verify_checks, record the outcome; "
          "with point_in_time (a PITR target's instant, \"latest\" or \"random\"): "
          "recover that instant in a scratch server and drill its dump",
          query=_WAIT, body={"type": "object", "additionalProperties": False,
                             # a backup's drill or an instant's, not both
                             "not": {"required": ["backup", "point_in_time"]},
                             "properties": {"backup": BACKUP_NAME, "identity": IDENTITY,
                                            "point_in_time": {"type": "string",
                                                              "maxLength": 40}}},
          idempotent=True, responses=_JOB),
    Route("GET", "/api/v1/schedules", h.schedules_view, Role.VIEWER,
          "Each target's schedule: next run, last slot and job, last outcome",
          responses=ok(SCHEDULES)),
    Route("GET", "/api/v1/destinations", h.destinations, Role.ADMIN,
          "Where backups are stored: each destination's health (reachable, writable, free "
          "space where knowable, backups and bytes) and the targets using it",
          responses=ok(DESTINATIONS)),
    Route("GET", "/api/v1/audit", h.audit, Role.ADMIN,
          "Audit trail: mutating requests and job outcomes, newest first",
          query={"subject": ("who", STR), "target": ("target id", STR),
                 "action": ("e.g. create_backup, job.restore", STR),
                 "result": ("ok, denied, rejected, error, succeeded, failed…", STR),
                 "job": ("job id", STR), "since": ("entries at or after this ISO time", TIME),
                 "via": ("the surface: cli, web, rest (curl, scripts), seed, mcp", STR),
                 "before": ("an entry id: the entries older than it (the answer's "
                            "next_before pages on)", EVENT_ID),
                 "limit": ("at most (default 100)", LIMIT)},
          responses=ok(AUDIT)),
    # the seed-compatible surface (../shared/seed-backup-api.md)
    *[Route(method, path, handler, role, summary, query=query, target_from_query=True,
            responses=responses, upload=path == "/backup/restore-upload",
            idempotent=path == "/backup/create")
      for method, path, handler, role, summary, query, responses in [
        ("POST", "/backup/create", seed.create, Role.OPERATOR, "Seed: create a backup and wait",
         {"compress": ("gzip (default true)", BOOL),
          "use_apoc": ("neo4j: export with APOC", BOOL), **_DB},
         {"200": Answer("created", SEED_CREATED), "202": _SEED_WAITING}),
        ("GET", "/backup/download/{filename}", seed.download_file, Role.OPERATOR,
         "Seed: download a backup", _DB, {"200": BACKUP_BYTES, "206": BACKUP_BYTES,
                                          "307": Answer("to a presigned URL")}),
        ("POST", "/backup/restore/{filename}", seed.restore, Role.OPERATOR,
         "Seed: restore a backup and wait", {**_SAFETY, **_DB}, _SEED_RESTORE),
        ("POST", "/backup/restore-upload", seed.restore_upload, Role.OPERATOR,
         "Seed: upload (multipart field `file`) and restore", {**_SAFETY, **_DB},
         _SEED_RESTORE),
        ("GET", "/backup/list", seed.list_backups, Role.VIEWER, "Seed: list backups", _DB,
         ok(SEED_LIST)),
        ("DELETE", "/backup/delete/{filename}", seed.delete, Role.ADMIN,
         "Seed: delete a backup", _DB, ok(SEED_DELETED)),
        ("GET", "/backup/stats", seed.stats, Role.VIEWER, "Seed: database statistics", _DB,
         ok(STATS)),
    ]],
    Route("POST", "/mcp", mcp_endpoint, Role.VIEWER,
          "MCP (streamable HTTP, stateless): the seed ADR's resources and tools; the same "
          "bearer token and roles; every tool call is audited by itself", audit=False,
          responses={"200": Answer("a JSON-RPC answer", media=(
              "application/json", "text/event-stream"))}),
    Route("GET", "/api/v1/events", all_events, Role.VIEWER,
          "Server-sent events of every job's status changes (dashboards, webhooks)",
          query={"last_event_id": ("replay after this event id (same as the header; "
                                   "400 invalid_last_event_id for anything else)", EVENT_ID)},
          responses={"200": Answer("an event stream", media=("text/event-stream",))}),
]


def add_routes(app: web.Application, routes: list[Route]) -> None:
    """Register the routes and index them by (method, path) for the auth middleware."""
    table: dict[tuple[str, str], Route] = {}
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)
        table[(r.method, r.path)] = r
        if r.method == "GET" and (r.ticket or r.path.startswith("/backup/download/")):
            # downloads answer HEAD too (size, ETag/checksum, ranges: no body)
            app.router.add_route("HEAD", r.path, r.handler)
            table[("HEAD", r.path)] = r
    app[ROUTE_TABLE] = table


def route_of(request: web.Request) -> Route | None:
    info = request.match_info.route
    resource = info.resource
    if resource is None:
        return None
    return request.app[ROUTE_TABLE].get((request.method, resource.canonical))
