"""A look at one table's rows inside a backup, nothing restored (issue 25: "which backup
still has customer 4711?"). Operators only, and audited: it shows data. The worker reads
the backup (it holds the identities that decrypt it) as a short job the API waits for."""

from __future__ import annotations

import re

from aiohttp import web

from api.http import caller, job_response, ops, query_float
from api.operations import Operations
from api.roles import Role
from api.scope import check_tables, scope_params
from shared.errors import BadRequest, Conflict, SafeholdError, Unprocessable
from shared.jobs import JobKind, JobParams, JobStatus

PREVIEW_WAIT = 60.0
MAX_LIMIT = 500
_WHERE = re.compile(r"([A-Za-z_][A-Za-z0-9_$]{0,62})=(.{0,1000})\Z", re.S)


def preview_params(table: str, where: str | None, limit: float | None) -> JobParams:
    params: JobParams = {"table": table, "limit": int(limit or 50)}
    if where is not None:
        if "\0" in where or not _WHERE.match(where):
            raise BadRequest("where is column=value: a plain column name, a value of at most "
                             "1000 characters", code="invalid_query")
        params["where"] = where
    return params


async def preview_rows(request: web.Request) -> web.Response:
    o: Operations = ops(request)
    who = caller(request)
    target_id, file = request.match_info["target"], request.match_info["file"]
    table = request.match_info["table"]
    params = preview_params(table, request.query.get("where"),
                            query_float(request, "limit", 1, MAX_LIMIT))
    async with o.audited(who, "preview_rows", target_id, {
            "backup": f"{file} table {table}"[:300]
            + (f" where {params['where']}"[:300] if params.get("where") else "")}):
        target = o.target(who, target_id, Role.OPERATOR)
        if target.engine not in ("postgresql", "sqlite", "mysql", "mongodb") or \
                target.is_set:
            raise Unprocessable("a preview reads a PostgreSQL, MySQL/MariaDB, MongoDB or "
                                f"SQLite target's backup (not {target.engine}, yet)",
                                code="invalid_body")
        scope = scope_params(o.s.settings, target, None, False, [table])  # checks the name
        name, manifest = await o.manifest(target.id, file)
        check_tables({**scope, "backup": name.filename}, manifest)
        params["backup"], params["sha256"] = name.filename, manifest["sha256"]
        job = await o.submit(who, JobKind.PREVIEW, target.id, params, {}, wait=PREVIEW_WAIT)
    if job.status == JobStatus.SUCCEEDED:
        return web.json_response(job.result)
    if job.status == JobStatus.FAILED and job.error:
        code = job.error.get("code", "preview_failed")
        raise _ANSWERS.get(code, SafeholdError)(job.error.get("message", "preview failed"),
                                                code=code)
    return job_response(job, request)


_ANSWERS: dict[str, type[SafeholdError]] = {
    "table_missing": Unprocessable, "column_missing": Unprocessable,
    "invalid_body": Unprocessable, "backup_changed": Conflict}
