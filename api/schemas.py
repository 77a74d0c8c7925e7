"""JSON schemas of what the API accepts and answers, for the OpenAPI document.

They state what every answer is guaranteed to hold (required keys, types, grammars) and
leave room for more (`additionalProperties` is not closed on answers), so schemathesis can
check each response against them and a client can rely on them."""

from __future__ import annotations

import re
from typing import Any

from shared.config import TARGET_ID_RE
from shared.jobs import JobKind, JobStatus
from shared.naming import _NAME_RE

Schema = dict[str, Any]  # a JSON schema, as written here (its values are of many kinds)
# a request body that passed its route's schema (api.http.read_json): each field is of the
# declared type, so a handler reads them as such
Body = dict[str, Any]


def _pattern(compiled: re.Pattern[str]) -> str:
    """A Python grammar as an ECMA-262 pattern (JSON Schema has no `\\Z`)."""
    return re.sub(r"\(\?P<\w+>", "(", str(compiled.pattern)).replace(r"\Z", "$")


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Schema], **optional: Schema) -> Schema:
    """An object with these keys always present (others may be added)."""
    return {"type": "object", "required": list(required),
            "properties": {**required, **optional}}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
OBJ: Schema = {"type": "object"}
TIME: Schema = {"type": "string", "description": "ISO 8601 time (UTC)"}
SHA256: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

TARGET_ID: Schema = {"type": "string", "pattern": _pattern(TARGET_ID_RE), "maxLength": 63}
BACKUP_NAME: Schema = {"type": "string", "pattern": _pattern(_NAME_RE), "maxLength": 128,
                       "description": "e.g. backup_postgresql_20241110_120000.sql.gz"}
SEED_DATABASE: Schema = {"anyOf": [TARGET_ID, {"const": ""}]}  # "": the default target
DOWNLOAD_PATH: Schema = {
    "type": "string", "maxLength": 1000, "description": "a backup's download path",
    "pattern": f"^/api/v1/targets/{_pattern(TARGET_ID_RE)[1:-1]}/backups/"
               f"{_pattern(_NAME_RE)[1:-1]}/download$"}
JOB_ID: Schema = {"type": "string", "pattern": "^[0-9a-f]{1,16}-[0-9a-f]{12}$"}
# a Redis stream entry id: an event's `id:` (Last-Event-ID) and an audit entry's id
EVENT_ID: Schema = {"type": "string", "pattern": r"^[0-9]{1,19}-[0-9]{1,19}$"}
JOB_STATUS: Schema = {"enum": [s.value for s in JobStatus]}
JOB_KIND: Schema = {"enum": [k.value for k in JobKind]}

PATH_PARAMS: dict[str, Schema] = {"target": TARGET_ID, "file": BACKUP_NAME,
                                  "filename": BACKUP_NAME, "job_id": JOB_ID}

# query parameters: a boolean is written true/false (1/0, yes/no, on/off are accepted too)
QUERY_BOOL: Schema = BOOL
WAIT: Schema = {"type": "number", "minimum": 0, "maximum": 3600}
LIMIT: Schema = {"type": "integer", "minimum": 1, "maximum": 1000}

ERROR: Schema = obj({"error": obj({"code": STR, "message": STR})})

PROGRESS: Schema = obj({}, phase=nullable(STR), percent=nullable(NUM),  # {} while queued
                       bytes_done=nullable(INT), bytes_total=nullable(INT),
                       items_done=nullable(INT), items_total=nullable(INT),
                       eta_s=nullable(NUM), elapsed_s=nullable(NUM))
JOB: Schema = obj({
    "id": JOB_ID, "kind": JOB_KIND, "target": TARGET_ID, "status": JOB_STATUS,
    "params": OBJ, "progress": nullable(PROGRESS), "result": nullable(OBJ),
    "error": nullable(obj({"code": STR, "message": STR})), "created_at": TIME,
    "started_at": nullable(TIME), "finished_at": nullable(TIME),
    "links": obj({"self": STR, "events": STR})},
    warnings={"type": "array", "items": STR})
JOBS: Schema = obj({"jobs": {"type": "array", "items": JOB}, "count": INT},
                   next_before=JOB_ID)

MANIFEST: Schema = obj({
    "filename": BACKUP_NAME, "target": TARGET_ID, "engine": STR,
    "kind": {"enum": ["backup", "safety_backup", "upload"]}, "sha256": SHA256,
    "size_bytes": INT, "created_at": TIME, "stored_on": {"type": "array", "items": STR},
    "compressed": BOOL, "encrypted": BOOL, "safety": BOOL},
    size_mib=NUM, raw_bytes=nullable(INT), destinations=OBJ, codecs={"type": "array"})
BACKUPS: Schema = obj({"target": TARGET_ID, "total_count": INT,
                       "backups": {"type": "array", "items": MANIFEST}})
RETENTION: Schema = obj({"target": TARGET_ID, "policy": OBJ, "destinations": OBJ})
RECOVERY_WINDOW: Schema = obj({
    "target": TARGET_ID, "earliest": nullable(TIME), "latest": nullable(TIME),
    "lag_s": nullable(NUM), "bases": {"type": "array", "items": OBJ},
    "gaps": {"type": "array", "items": OBJ}, "streaming": OBJ},
    timeline=nullable(INT), wal=nullable(OBJ), unavailable={"type": "array", "items": STR},
    engine=STR, binlog=nullable(OBJ), basename=nullable(STR), gtid=nullable(OBJ))
CONTENT_ITEM: Schema = obj({"name": STR, "count": nullable(INT)}, bytes=INT)
CONTENTS: Schema = obj({"backup": STR, "engine": STR},
                       created_at=TIME, raw_bytes=nullable(INT), unit=nullable(STR),
                       exact=BOOL, total=INT, items={"type": "array", "items": CONTENT_ITEM},
                       databases={"type": "array", "items": OBJ})
PREVIEW: Schema = obj({"backup": STR, "table": STR, "rows": {"type": "array", "items": {
    "type": "array", "items": nullable(STR)}}}, columns={"type": ["array", "null"],
                                                        "items": STR},
    where=nullable(STR), limit=INT, complete=nullable(BOOL), checksum_verified=BOOL,
    scanned_rows=INT, truncated_values=BOOL, read_plain_bytes=nullable(INT),
    **{"from": STR})
DELETED: Schema = obj({"deleted": {"type": "array", "items": STR}, "target": TARGET_ID})

TARGET: Schema = obj({"id": TARGET_ID, "engine": STR, "schedule": nullable(STR),
                      "destinations": {"type": "array", "items": STR}, "encrypted": BOOL})
TARGETS: Schema = obj({"default_target": nullable(TARGET_ID),
                       "targets": {"type": "array", "items": TARGET}})
STATS: Schema = obj({"engine": STR}, server_version=nullable(STR), size_bytes=nullable(INT))
WHOAMI: Schema = obj({"subject": STR, "role": nullable(STR), "targets": OBJ})
TICKET: Schema = obj({"url": STR, "expires_in": INT})
LOGIN_CONFIG: Schema = obj({"oidc": nullable(OBJ), "dev_mode": BOOL}, sso_unavailable=STR)
LOGIN_TOKEN: Schema = obj({"access_token": STR})
SCHEDULES: Schema = obj({"schedules": {"type": "array", "items": obj({
    "target": TARGET_ID, "schedule": nullable(STR), "next_run": nullable(TIME),
    "last_job": nullable(STR), "last_status": nullable(STR)})}})
DESTINATIONS: Schema = obj({"destinations": {"type": "array", "items": obj({
    "name": STR, "type": {"enum": ["local", "s3"]}, "reachable": BOOL,
    "targets": {"type": "array", "items": STR}})}})
AUDIT: Schema = obj({"entries": {"type": "array", "items": obj(
    {"id": STR, "action": STR, "result": STR, "ts": TIME},
    subject=STR)}, "count": INT}, next_before=STR)  # no subject: never a valid token
HEALTH: Schema = obj({"status": {"const": "ok"}})
READY: Schema = obj({"status": {"enum": ["ready", "not_ready"]}, "checks": obj(
    {"redis": STR, "workers": nullable(INT)})})
JWKS: Schema = obj({"keys": {"type": "array", "items": OBJ}})
OPENAPI: Schema = obj({"openapi": STR, "paths": OBJ})

# the seed surface's answers (../shared/seed-backup-api.md)
SEED_CREATED: Schema = obj({"success": BOOL, "message": STR, "filename": BACKUP_NAME,
                            "size_mb": NUM})
SEED_RESTORED: Schema = obj({"success": BOOL, "message": STR,
                             "safety_backup_created": BOOL},
                            safety_backup_filename=nullable(BACKUP_NAME))
SEED_LIST: Schema = obj({"backups": {"type": "array", "items": obj({
    "filename": BACKUP_NAME, "size_bytes": INT, "size_mb": NUM, "created_at": STR,
    "compressed": BOOL})}})
SEED_DELETED: Schema = obj({"success": BOOL, "message": STR})
