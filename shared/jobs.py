"""Job records and their event streams (DESIGN.md §3).

A job is a Redis hash `<prefix>:job:<id>`; complex fields are JSON. Status changes go
through one Lua script that checks the allowed previous status, writes the fields, keeps
the `running` set in step and appends the event to the job's stream and the global stream
atomically, so a reader never sees a status without its event or the reverse.

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled | failed
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Required, TypedDict, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from shared import rcmd
from shared.errors import Conflict, NotFound
from shared.keys import Keys
from shared.outage import ride_out

T = TypeVar("T")

class JobKind(StrEnum):
    """What a job does: the one list of kinds (the API's enum, filters and metrics read
    it). Members equal their strings, so records and query values compare directly."""

    BACKUP = "backup"
    RESTORE = "restore"
    STATS = "stats"
    PRUNE = "prune"
    VERIFY = "verify"
    PREVIEW = "preview"  # rows of one table read from a backup (nothing restored)


class JobStatus(StrEnum):
    """Where a job stands; the transitions are in the module docstring."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Phase(StrEnum):
    """What a running job is doing now (its `phase` events and progress): the one list."""

    STARTING = "starting"
    QUERYING = "querying"  # stats
    READING = "reading"  # preview: a backup's rows
    WAITING_FOR_LOCK = "waiting_for_lock"
    SNAPSHOT = "snapshot"  # sqlite: the online backup into a private copy
    DUMPING = "dumping"
    PUBLISHING = "publishing"  # manifests written: the backup's commit
    PLANNING = "planning"  # prune
    DELETING = "deleting"
    VERIFYING = "verifying"
    RECOVERING = "recovering"  # point in time: a scratch server replays the archive
    CHECKING = "checking"
    SAFETY_BACKUP = "safety_backup"
    CLEANING = "cleaning"
    RESTORING = "restoring"
    INDEXING = "indexing"
    REPLACING = "replacing"
    ROLLING_BACK = "rolling_back"


class RestoreStage(StrEnum):
    """Where a restore stands, written to the job record BEFORE each step
    (`restore_state`): what RESTORE_STATES says the database is in if the worker dies."""

    UNTOUCHED = "untouched"
    UNCOMMITTED = "uncommitted"
    COMMITTING = "committing"
    PARTIAL = "partial"
    ROLLING_BACK = "rolling_back"


class Requester(TypedDict, total=False):
    """Who asked for a job (or a backup, in its manifest): the principal as the API saw
    it, and the surface it came through."""

    subject: str  # absent only in a record written before requesters were recorded
    client: str | None
    role: str | None  # the global role (api.roles names)
    scoped: dict[str, str]  # target -> role, for scoped tokens
    restricted_to: list[str] | None
    via: str  # cli | web | rest | seed | mcp


class JobParams(TypedDict, total=False):
    """What a job was asked to do, as submitted (every surface builds these through
    api.operations; the worker reads them)."""

    backup: str  # restore, verify: the backup's file name
    sha256: str  # restore: the bytes the caller chose (a replaced file is refused)
    create_safety_backup: bool
    terminate_connections: bool
    roles: str  # restore: create | map | skip
    owner_map: dict[str, str]
    database: str  # restore: one database of a server target's set
    point_in_time: str  # restore: RFC 3339 UTC instant, or "latest" (PITR targets)
    into_database: str  # restore: into this new database beside the live one
    replace: bool  # restore into_database: over it when it exists
    tables: list[str]  # restore: only these tables (PostgreSQL schema.table)
    schemas: list[str]  # restore (PostgreSQL): the tables of these schemas (in `tables`)
    from_target: str  # restore into_target: the target whose backup this is
    keys: list[str]  # restore (Redis): only the keys these glob patterns match
    table: str  # preview: the table read
    where: str  # preview: column=value
    limit: int  # preview: rows at most
    identity_supplied: bool  # an age identity was sealed for this job
    compress: bool  # backup
    note: str
    format: str  # backup: an engine's other format (naming.ENGINE_FORMATS)
    use_apoc: bool
    dry_run: bool  # prune
    reason: str  # prune: requested, daily, after <job>
    scheduled_slot: str  # a scheduled job: its slot and when it was due
    scheduled_for: str


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
EVENT_MAXLEN = 10_000
GLOBAL_EVENT_MAXLEN = 100_000
# where a restore stands, written to the job record BEFORE each step, so whoever finds the
# job orphaned (worker_lost) can say what state the database is in
RESTORE_STATES: dict[str, tuple[str, str]] = {
    RestoreStage.UNTOUCHED: ("unchanged", "the restore had not started loading"),
    RestoreStage.UNCOMMITTED: (
        "unchanged", "the restore was loading inside a transaction that was never "
                     "committed; the server rolled it back"),
    RestoreStage.COMMITTING: (
        "unknown", "the worker died while committing: the database holds either the whole "
                   "backup or its previous state"),
    RestoreStage.PARTIAL: (
        "unknown", "the restore was loading and this engine cannot load in one "
                   "transaction: the database may be partially restored"),
    RestoreStage.ROLLING_BACK: (
        "unknown", "the worker died while rolling back from the safety backup"),
}


def restore_cancellable(state: str | None) -> bool:
    """A restore may be cancelled while stopping it leaves the database unchanged."""
    return RESTORE_STATES.get(state or "untouched", ("unknown", ""))[0] == "unchanged"


class UndoHint(TypedDict):
    """The one API call that puts a database back as it was before a restore."""

    method: str
    path: str
    body: dict[str, object]


class JobError(TypedDict, total=False):
    """A failed or cancelled job's `error`: an ErrorDoc, and what the failure left behind
    (a restore's: the database's state, its safety backup, the rollback, the undo)."""

    code: Required[str]
    message: Required[str]
    database_state: str  # unchanged | rolled_back | unknown
    safety_backup: str | None
    rollback: dict[str, object] | None
    undo: UndoHint
    leftover_database: str  # a restore beside: the new database it may have left behind
    cause: str  # a safety backup's failure: what stopped it
    verification: dict[str, object]  # a failed drill's record
    line: int


def undo_hint(target: str, safety: str, into_database: object = None,
              tables: object = None) -> UndoHint:
    """The one call that puts a database back as it was before a restore (a restore beside
    the live database: that database, never the live one)."""
    body: dict[str, object] = {"backup": safety, "create_safety_backup": False}
    if isinstance(into_database, str) and into_database:
        body.update(into_database=into_database, replace=True)
    if isinstance(tables, list) and tables:  # a safety backup of those tables only
        body["tables"] = tables
    return {"method": "POST", "path": f"/api/v1/targets/{target}/restores", "body": body}


_JSON_FIELDS = ("params", "requested_by", "progress", "result", "error")

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
local ok = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then ok = true end end
local nfields = tonumber(ARGV[6])
if not ok then
  -- a retry of this very transition (its answer was lost in an outage) succeeded already
  if redis.call('HGET', KEYS[1], 'transition_token') == ARGV[10 + nfields] then
    return {1, 'again'} end
  return {0, cur} end
local new = ARGV[2]
local etype = new
if new == 'running' then etype = 'started' end
if nfields > 0 then redis.call('HSET', KEYS[1], 'status', new, unpack(ARGV, 7, 6 + nfields)) else
  redis.call('HSET', KEYS[1], 'status', new) end
if new == 'running' then redis.call('SADD', KEYS[2], ARGV[3])
else redis.call('SREM', KEYS[2], ARGV[3]) end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7 + nfields], '*',
  'type', etype, 'job', ARGV[3], 'ts', ARGV[4], 'data', ARGV[5])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8 + nfields], '*',
  'type', etype, 'job', ARGV[3], 'ts', ARGV[4], 'data', ARGV[5])
local ttl = tonumber(ARGV[9 + nfields])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return {1, id}
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Sortable, unguessable: time prefix + random suffix."""
    return f"{int(time.time() * 1000):x}-{secrets.token_hex(6)}"


# what a job ended with (BackupResult, RestoreResult, a drill's record, a prune's report):
# JSON, kept in the job's hash and read back from it
JobResult = Mapping[str, object]


@dataclass
class Job:
    id: str
    kind: JobKind
    target: str
    status: JobStatus
    created_at: str
    params: JobParams = field(default_factory=lambda: JobParams())
    requested_by: Requester = field(default_factory=lambda: Requester())
    progress: dict[str, object] = field(default_factory=dict)
    result: JobResult | None = None
    error: JobError | None = None
    started_at: str | None = None
    finished_at: str | None = None
    worker: str | None = None
    cancel_requested: bool = False
    temp_handles: str | None = None  # pending backups' store handles, space-separated
    safety_backup: str | None = None  # restores: the safety backup made before loading
    restore_state: str | None = None  # restores: see RESTORE_STATES

    @property
    def cancellable(self) -> bool:
        """Queued, or a restore that has not changed the database (or changed it only
        inside a transaction that a cancel rolls back)."""
        if self.status == JobStatus.QUEUED:
            return True
        if self.status != JobStatus.RUNNING:
            return False
        return self.kind != JobKind.RESTORE or restore_cancellable(self.restore_state)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "status": self.status,
            "params": self.params,
            "requested_by": self.requested_by,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "cancel_requested": self.cancel_requested,
            **({"safety_backup": self.safety_backup, "restore_state": self.restore_state}
               if self.kind == JobKind.RESTORE else {}),
        }

    @classmethod
    def from_hash(cls, h: Mapping[bytes, bytes]) -> Job:
        d: dict[str, Any] = {k.decode(): v.decode() for k, v in h.items()}
        for f in _JSON_FIELDS:
            d[f] = json.loads(d[f]) if d.get(f) else None
        return cls(
            id=d["id"],
            kind=JobKind(d["kind"]),
            target=d["target"],
            status=JobStatus(d["status"]),
            created_at=d["created_at"],
            params=cast(JobParams, d["params"] or {}),  # written by create() below
            requested_by=cast(Requester, d["requested_by"] or {}),
            progress=d["progress"] or {},
            result=d["result"],
            error=d["error"],
            started_at=d.get("started_at") or None,
            finished_at=d.get("finished_at") or None,
            worker=d.get("worker") or None,
            cancel_requested=d.get("cancel_requested") == "1",
            temp_handles=d.get("temp_handles") or None,
            safety_backup=d.get("safety_backup") or None,
            restore_state=d.get("restore_state") or None,
        )


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    job: str
    ts: str
    data: dict[str, object]

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "type": self.type, "job": self.job, "ts": self.ts, **self.data}


def _event(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Event:
    return Event(
        id=entry_id.decode(),
        type=fields[b"type"].decode(),
        job=fields[b"job"].decode(),
        ts=fields[b"ts"].decode(),
        data=json.loads(fields.get(b"data") or b"{}"),
    )


class JobStore:
    """Create, read, transition and list jobs; append and read their events."""

    def __init__(self, redis: Redis, keys: Keys, *, ttl: float = 7 * 86400,
                 grace: float = 0.0) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = int(ttl)
        # a worker's store rides out a Redis outage this long (shared/outage.py); the
        # API's answers at once (a request is retried by its client)
        self.grace = grace
        self._transition = redis.register_script(_TRANSITION)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        if self.grace <= 0:
            return await call()
        return await ride_out(what, call, self.grace)

    def name_claimer(self, target: str, owner: str) -> Callable[[str], Awaitable[bool]]:
        """A `Catalog.reserve` claim: SET NX on the name for a day (a backup never takes
        longer to publish than the job timeouts allow)."""
        async def claim(filename: str) -> bool:
            # a retry after a lost answer finds its own claim, and takes it as won
            key = self.keys.name_claim(target, filename)

            async def once() -> bool:
                if await self.redis.set(key, owner, nx=True, ex=86400):
                    return True
                return bool(await self.redis.get(key) == owner.encode())
            return await self._call(f"claiming the name {filename}", once)
        return claim

    async def create(
        self,
        kind: JobKind,
        target: str,
        params: JobParams,
        requested_by: Requester,
        *,
        idempotency_key: str | None = None,
        stage: Callable[[Pipeline, Job], None] | None = None,
    ) -> tuple[Job, bool]:
        """Create a queued job; with an idempotency key a repeat returns the first job.
        Keys belong to the caller (`requested_by.subject`): another caller's same key is
        another job, never a peek at theirs; the same key with other parameters is refused
        (409 `idempotency_key_reused`).

        `stage(pipe, job)` adds commands to the transaction that writes a new job (its
        queue entry: the record and the queue are written together or not at all).

        Returns (job, created).
        """
        job_id = new_job_id()
        if idempotency_key:
            subject = str(requested_by.get("subject") or "")
            ikey = self.keys.idempotency(
                f"{len(subject)}:{subject}:{kind}:{target}:{idempotency_key}")
            if not await self.redis.set(ikey, job_id, nx=True, ex=self.ttl):
                # the first caller may not have written its job record yet: wait for it
                # rather than take the key over (that would make a second job)
                for _ in range(50):
                    existing = await self.redis.get(ikey)
                    if existing is None:
                        break  # expired meanwhile: take it below
                    found = await self.find(existing.decode())
                    if found is not None:
                        if found.params != json.loads(json.dumps(dict(params))):
                            raise Conflict(
                                "this Idempotency-Key was used for a request with other "
                                f"parameters (job {found.id}); use a new key",
                                code="idempotency_key_reused")
                        return found, False
                    await asyncio.sleep(0.1)
                else:
                    pass  # a key whose job never appeared (its creator died): take it over
                await self.redis.set(ikey, job_id, ex=self.ttl)
        job = Job(id=job_id, kind=JobKind(kind), target=target, status=JobStatus.QUEUED,
                  created_at=now_iso(), params=params.copy(), requested_by=requested_by.copy())
        mapping = {
            "id": job.id, "kind": job.kind.value, "target": target,
            "status": job.status.value,
            "created_at": job.created_at, "params": json.dumps(job.params),
            "requested_by": json.dumps(job.requested_by), "progress": json.dumps({}),
        }
        data = json.dumps({"status": "queued", "kind": kind, "target": target})
        ts = now_iso()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.job(job_id), mapping=mapping)
            pipe.expire(self.keys.job(job_id), self.ttl)
            pipe.zadd(self.keys.job_index, {job_id: time.time()})
            for stream, maxlen in ((self.keys.events(job_id), EVENT_MAXLEN),
                                   (self.keys.global_events, GLOBAL_EVENT_MAXLEN)):
                pipe.xadd(stream, {"type": "queued", "job": job_id, "ts": ts, "data": data},
                          maxlen=maxlen, approximate=True)
            pipe.expire(self.keys.events(job_id), self.ttl)
            if stage is not None:
                stage(pipe, job)
            await pipe.execute()
        return job, True

    async def find(self, job_id: str) -> Job | None:
        async def once() -> dict[bytes, bytes]:
            return await rcmd.hgetall(self.redis, self.keys.job(job_id))
        h = await self._call(f"reading job {job_id}", once)
        return Job.from_hash(h) if h else None

    async def get(self, job_id: str) -> Job:
        job = await self.find(job_id)
        if job is None:
            raise NotFound(f"no job '{job_id}'", code="job_not_found")
        return job

    async def transition(
        self,
        job_id: str,
        allowed_from: Iterable[JobStatus],
        new: JobStatus,
        *,
        fields: Mapping[str, object] | None = None,
        data: Mapping[str, object] | None = None,
    ) -> bool:
        """Atomically move a job to `new` if its status is in `allowed_from`.

        `fields` are written to the hash (dicts JSON-encoded); `data` is the event payload.
        Returns False (writing nothing) when the job is not in an allowed status.
        """
        flat: list[str] = []
        for k, v in (fields or {}).items():
            flat += [k, json.dumps(v) if isinstance(v, dict | list) or v is None else str(v)]
        token = secrets.token_hex(8)  # the same for every retry of this one transition
        flat += ["transition_token", token]
        payload = {"status": new, **(data or {})}
        ok, _ = await self._call(f"moving job {job_id} to {new}", lambda: self._transition(
            keys=[self.keys.job(job_id), self.keys.running, self.keys.events(job_id),
                  self.keys.global_events],
            args=[",".join(allowed_from), new, job_id, now_iso(), json.dumps(payload),
                  len(flat), *flat, EVENT_MAXLEN, GLOBAL_EVENT_MAXLEN, self.ttl, token],
        ))
        return bool(ok)

    async def set_fields(self, job_id: str, **fields: object) -> None:
        enc = {k: json.dumps(v) if isinstance(v, dict | list) else str(v)
               for k, v in fields.items()}
        async def once() -> None:
            await rcmd.hset(self.redis, self.keys.job(job_id), mapping=enc)
        await self._call(f"recording {', '.join(fields)} of job {job_id}", once)

    async def publish(self, job_id: str, type_: str, data: Mapping[str, object],
                      *, progress: Mapping[str, object] | None = None) -> None:
        """Append a non-transition event (`progress`, `phase`, `log`); optionally save progress."""
        async def once() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                if progress is not None:
                    pipe.hset(self.keys.job(job_id), "progress", json.dumps(progress))
                pipe.xadd(self.keys.events(job_id), {"type": type_, "job": job_id,
                                                     "ts": now_iso(), "data": json.dumps(data)},
                          maxlen=EVENT_MAXLEN, approximate=True)
                await pipe.execute()
        await self._call(f"publishing a {type_} event of job {job_id}", once)

    async def list_jobs(
        self,
        *,
        target: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        targets: set[str] | None = None,
        before: str | None = None,
    ) -> list[Job]:
        """Newest first, filtered; drops index entries whose record expired. `before`: a
        job id; only jobs created before it (the next page after a page ending there)."""
        upper: float | str = "+inf"
        if before is not None:
            score = await self.redis.zscore(self.keys.job_index, before)
            if score is None:
                raise NotFound(f"no job {before!r} to page from (expired, or not a job id)",
                               code="job_not_found")
            upper = f"({score!r}"
        await self.redis.zremrangebyscore(self.keys.job_index, "-inf", time.time() - self.ttl)
        out: list[Job] = []
        start = 0
        # no filter but the caller's visible targets (which most jobs pass): start with the
        # jobs asked for; the page doubles while matches are missing
        filtered = any(f is not None for f in (target, status, kind))
        page = 200 if filtered else max(limit, 10)
        while len(out) < limit:
            ids = await self.redis.zrevrangebyscore(self.keys.job_index, upper, "-inf",
                                                    start=start, num=page)
            if not ids:
                break
            start += page
            page = min(page * 2, 1000)
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hgetall(self.keys.job(i.decode()))
                hashes = await pipe.execute()
            gone = [i for i, h in zip(ids, hashes, strict=True) if not h]
            if gone:
                await self.redis.zrem(self.keys.job_index, *gone)
            for h in hashes:
                if not h:
                    continue
                job = Job.from_hash(h)
                if ((target is None or job.target == target)
                        and (targets is None or job.target in targets)
                        and (status is None or job.status == status)
                        and (kind is None or job.kind == kind)):
                    out.append(job)
                    if len(out) >= limit:
                        break
        return out

    async def active_for_target(self, target: str) -> list[Job]:
        jobs = await self.list_jobs(target=target, limit=1000)
        return [j for j in jobs if not j.terminal]

    async def latest_global_event_id(self) -> str:
        rows = await self.redis.xrevrange(self.keys.global_events, count=1)
        return rows[0][0].decode() if rows else "0-0"

    async def running_ids(self) -> list[str]:
        members = await rcmd.smembers(self.redis, self.keys.running)
        return [i.decode() for i in members]
