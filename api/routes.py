"""The route table: every route declares the role it needs (or PUBLIC)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from api import handlers as h
from api import page, seed
from api.context import ROUTE_TABLE
from api.docs import docs_file, docs_index
from api.events import all_events, job_events
from api.mcp_server import mcp_endpoint
from api.metrics import metrics
from api.openapi import openapi
from api.roles import Role
from api.uploads import upload_backup

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: Role
    summary: str
    query: dict[str, str] = field(default_factory=dict)  # name -> description
    body: dict[str, Any] | None = None  # JSON schema of the request body
    responses: dict[str, str] = field(default_factory=dict)
    target_from_query: bool = False  # seed routes: `?database=<target>` or the default
    ticket: bool = False  # also reachable with a one-use `?ticket=` (browser downloads)
    audit: bool = True  # False: the handler audits each call itself (MCP tools)


T = "/api/v1/targets/{target}"
_BACKUP_BODY = {"type": "object", "additionalProperties": False, "properties": {
    "compress": {"type": "boolean", "default": True,
                 "description": "false: no compression (else the target's gzip or zstd)"},
    "note": {"type": "string", "maxLength": 500},
    "format": {"type": "string", "description": "engine-specific: redis `resp` (default) "
               "or `rdb`"}}}
_RESTORE_BODY = {"type": "object", "additionalProperties": False, "required": ["backup"],
                 "properties": {"backup": {"type": "string"},
                                "create_safety_backup": {"type": "boolean", "default": True},
                                "identity": {"type": "string", "maxLength": 65536,
                                             "description": "age identity for an encrypted "
                                             "backup; sealed to the live workers, never "
                                             "stored"}}}
_DB = {"database": "target id (default: the configured default_target)"}
_WAIT = {"wait": "seconds to wait for the job to finish (200 if it did, else 202)"}
_JOB = {"202": "job accepted (or still running after ?wait)", "200": "job finished"}

ROUTES: list[Route] = [
    Route("GET", "/healthz", h.healthz, Role.PUBLIC, "Process is up"),
    Route("GET", "/readyz", h.readyz, Role.PUBLIC,
          "Redis reachable and at least one live worker",
          responses={"200": "ready", "503": "not ready"}),
    Route("GET", "/metrics", metrics, Role.PUBLIC,
          "Prometheus metrics (public unless auth.public_metrics = false: then viewer)"),
    Route("GET", "/.well-known/jwks.json", h.jwks, Role.PUBLIC,
          "Dev mode only: the public key that verifies `safehold token` tokens"),
    Route("GET", "/api/v1/openapi.json", openapi, Role.PUBLIC,
          "This document (public: it names routes, never targets or data)"),
    Route("GET", "/docs", docs_index, Role.PUBLIC, "Interactive API documentation"),
    Route("GET", "/docs/{file}", docs_file, Role.PUBLIC, "Swagger UI's files"),
    Route("GET", "/api/v1/targets", h.list_targets, Role.VIEWER, "Configured targets"),
    Route("GET", f"{T}/stats", h.target_stats, Role.VIEWER,
          "Database size, tables with row estimates, server version"),
    Route("POST", f"{T}/backups", h.create_backup, Role.OPERATOR, "Start a backup job",
          query=_WAIT, body=_BACKUP_BODY, responses=_JOB),
    Route("GET", f"{T}/backups", h.list_backups, Role.VIEWER,
          "Backups (manifests), newest first; safety backups flagged"),
    Route("GET", f"{T}/backups/{{file}}", h.get_backup, Role.VIEWER, "One backup's manifest"),
    Route("GET", f"{T}/backups/{{file}}/download", h.download_backup, Role.OPERATOR,
          "Download a backup from the first destination holding it (supports Range; S3 "
          "destinations may redirect to a presigned URL). A browser passes `?ticket=` "
          "from POST /api/v1/tickets instead of the Authorization header",
          query={"ticket": "one-use download ticket (60 s) instead of a bearer token"},
          ticket=True),
    Route("POST", "/api/v1/tickets", page.create_ticket, Role.VIEWER,
          "A one-use, 60-second ticket for one download path (for links in a browser, "
          "which cannot send Authorization); the roles are checked when it is used",
          body={"type": "object", "required": ["path"], "additionalProperties": False,
                "properties": {"path": {"type": "string"}}}),
    Route("GET", "/api/v1/whoami", page.whoami, Role.VIEWER,
          "The token's subject, global role and role per visible target"),
    Route("GET", "/", page.index, Role.PUBLIC, "The web page"),
    Route("GET", "/api/v1/login-config", page.login_config, Role.PUBLIC,
          "How the web page logs in: SSO (authorization code + PKCE) or a pasted token"),
    Route("POST", "/api/v1/login/token", page.login_token, Role.PUBLIC,
          "SSO: exchange the page's authorization code and PKCE verifier for a token",
          body={"type": "object", "required": ["code", "code_verifier", "redirect_uri"],
                "properties": {"code": {"type": "string"},
                               "code_verifier": {"type": "string"},
                               "redirect_uri": {"type": "string"}}}),
    Route("GET", "/static/{file}", page.static, Role.PUBLIC, "The web page's files"),
    Route("DELETE", f"{T}/backups/{{file}}", h.delete_backup, Role.ADMIN, "Delete a backup"),
    Route("POST", f"{T}/uploads", upload_backup, Role.OPERATOR,
          "Upload a backup (multipart field `file`, or the raw body): streamed, size-capped, "
          "checksummed and validated before it is listed as upload_…",
          query={"restore": "true: restore it right after (a restore job)",
                 "create_safety_backup": "with restore=true (default true)",
                 "wait": "with restore=true: seconds to wait for the restore"},
          responses={"201": "stored", "202": "stored, restore running", "413": "too large"}),
    Route("POST", f"{T}/restores", h.create_restore, Role.OPERATOR,
          "Start a restore job (verify, safety backup, clean restore, rollback on failure)",
          query=_WAIT, body=_RESTORE_BODY, responses=_JOB),
    Route("GET", "/api/v1/jobs", h.list_jobs, Role.VIEWER, "Jobs, newest first",
          query={"target": "filter by target", "status": "filter by status",
                 "kind": "filter by kind", "limit": "at most this many (default 100)"}),
    Route("GET", "/api/v1/jobs/{job_id}", h.get_job, Role.VIEWER, "One job"),
    Route("DELETE", "/api/v1/jobs/{job_id}", h.cancel_job, Role.OPERATOR,
          "Cancel a job (queued: never starts; running backup: stops, keeps nothing)"),
    Route("GET", "/api/v1/jobs/{job_id}/events", job_events, Role.VIEWER,
          "Server-sent events of a job (resumable with Last-Event-ID)",
          query={"last_event_id": "resume after this event id (same as the header)"}),
    Route("POST", f"{T}/prune", h.prune, Role.ADMIN,
          "Apply the target's retention policy now (a prune job, audited per deletion)",
          query={"dry_run": "true: return the plan (keep/delete and why), delete nothing",
                 **_WAIT}, responses=_JOB),
    Route("POST", f"{T}/verify", h.verify, Role.OPERATOR,
          "Restore drill: restore the newest (or the given) backup into a scratch place, "
          "compare exact counts with the dump's, run verify_checks, record the outcome",
          query=_WAIT, body={"type": "object", "additionalProperties": False,
                             "properties": {"backup": {"type": "string"}}}, responses=_JOB),
    Route("GET", "/api/v1/schedules", h.schedules_view, Role.VIEWER,
          "Each target's schedule: next run, last slot and job, last outcome"),
    Route("GET", "/api/v1/destinations", h.destinations, Role.ADMIN,
          "Where backups are stored: each destination's health (reachable, writable, free "
          "space where knowable, backups and bytes) and the targets using it"),
    Route("GET", "/api/v1/audit", h.audit, Role.ADMIN,
          "Audit trail: mutating requests and job outcomes, newest first",
          query={"subject": "who", "target": "target id", "action": "e.g. create_backup, "
                 "job.restore", "result": "ok, denied, rejected, error, succeeded, failed…",
                 "job": "job id", "since": "ISO time", "limit": "at most (default 100)"}),
    # the seed-compatible surface (../shared/seed-backup-api.md)
    *[Route(method, path, handler, role, summary, query=query, target_from_query=True)
      for method, path, handler, role, summary, query in [
        ("POST", "/backup/create", seed.create, Role.OPERATOR, "Seed: create a backup and wait",
         {"compress": "gzip (default true)", "use_apoc": "neo4j: export with APOC", **_DB}),
        ("GET", "/backup/download/{filename}", seed.download_file, Role.OPERATOR,
         "Seed: download a backup", _DB),
        ("POST", "/backup/restore/{filename}", seed.restore, Role.OPERATOR,
         "Seed: restore a backup and wait", {"create_safety_backup": "default true", **_DB}),
        ("POST", "/backup/restore-upload", seed.restore_upload, Role.OPERATOR,
         "Seed: upload (multipart field `file`) and restore", {
             "create_safety_backup": "default true", **_DB}),
        ("GET", "/backup/list", seed.list_backups, Role.VIEWER, "Seed: list backups", _DB),
        ("DELETE", "/backup/delete/{filename}", seed.delete, Role.ADMIN,
         "Seed: delete a backup", _DB),
        ("GET", "/backup/stats", seed.stats, Role.VIEWER, "Seed: database statistics", _DB),
    ]],
    Route("POST", "/mcp", mcp_endpoint, Role.VIEWER,
          "MCP (streamable HTTP, stateless): the seed ADR's resources and tools; the same "
          "bearer token and roles; every tool call is audited by itself", audit=False),
    Route("GET", "/api/v1/events", all_events, Role.VIEWER,
          "Server-sent events of every job's status changes (dashboards, webhooks)",
          query={"last_event_id": "replay after this event id (same as the header)"}),
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
