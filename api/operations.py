"""The operations every surface calls: REST v1, the seed `/backup/*` surface, MCP.

Each operation checks the caller's role on the target itself and writes the audit entry
itself (with the surface it came through: `client: rest | seed | mcp`), so no surface can
skip either. Surfaces only translate: HTTP query/body or MCP tool arguments in, JSON out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypedDict

from redis.exceptions import RedisError

from api import recovery
from api.auth import Principal, require
from api.context import Services
from api.roles import Role
from api.scope import check_tables, scope_params, scope_words
from api.upload_store import Receive, store_upload
from shared import backup_sets, codecs, naming, rcmd, stats
from shared.config import TargetConfig
from shared.contents import contents
from shared.errors import (
    BadRequest,
    Conflict,
    NotFound,
    SafeholdError,
    TooMany,
    Unavailable,
    Unprocessable,
)
from shared.jobs import TERMINAL, Event, Job, JobKind, JobParams, Requester
from shared.manifests import ManifestDoc
from shared.naming import ENGINE_FORMATS
from shared.storage.base import BackupStore

log = logging.getLogger("safehold.api")
MAX_WAIT = 3600.0
NO_WORKER_WARNING = ("no live worker: the job waits in the queue until one runs (start one "
                     "with `safehold worker`)")


@dataclass
class Caller:
    """Who calls, through which surface, and where from (for the audit entry)."""

    principal: Principal
    surface: str = "rest"  # cli | web | rest (any other HTTP client) | seed | mcp
    request_id: str | None = None
    remote: str | None = None
    method: str | None = None
    path: str | None = None
    audited: bool = False  # an operation wrote this call's audit entry
    warnings: list[str] = field(default_factory=list)

    def requested_by(self) -> Requester:
        return {**self.principal.to_dict(), "via": self.surface}


class AuditInfo(TypedDict, total=False):
    """What an operation learns as it goes that its audit entry names (the backup it
    resolved, the job it created, the target a job id led to)."""

    target: str
    backup: str
    job: str


def backup_view(m: ManifestDoc) -> dict[str, object]:
    size = int(m.get("size_bytes") or 0)
    return {**m, "size_bytes": size, "size_mib": round(size / (1024 * 1024), 2),
            "size_mb": round(size / (1024 * 1024), 2),  # seed name; the unit is MiB
            "compressed": any(c.get("codec") in ("gzip", "zstd")
                              for c in codecs.chain_of(m)),
            "encrypted": any(c.get("codec") == "age" for c in codecs.chain_of(m)),
            "safety": m.get("kind") == "safety_backup",
            **({"databases": [x.get("database") for x in entries]}
               if (entries := backup_sets.member_entries(m)) is not None else {})}


class Operations:
    def __init__(self, services: Services) -> None:
        self.s = services

    # ------------------------------------------------------------------ plumbing
    @contextlib.asynccontextmanager
    async def audited(self, caller: Caller, action: str, target: str | None,
                       info: AuditInfo, *, unless_recorded: bool = False
                       ) -> AsyncIterator[AuditInfo]:
        """Record the outcome of a mutating operation (refusals included) once. With
        `unless_recorded` (a surface's wrapper around a call), nothing is added when an
        operation inside already wrote the call's entry."""
        recorded_before = caller.audited
        status, result = 200, "ok"
        try:
            yield info
        except SafeholdError as exc:
            status = exc.status
            result = ("denied" if status in (401, 403) else "rejected" if status < 500
                      else "error")
            raise
        except (RedisError, OSError):
            status, result = 503, "error"
            raise
        except BaseException:
            status, result = 500, "error"
            raise
        finally:
            if not (unless_recorded and caller.audited and not recorded_before):
                caller.audited = True
                await self._record(caller, action, target, info, status, result)

    async def _record(self, caller: Caller, action: str, target: str | None,
                      info: AuditInfo, status: int, result: str) -> None:
        p = caller.principal
        try:
            await self.s.audit.record(
                action=action, result=result, status=status, subject=p.subject,
                client=p.client, via=caller.surface,
                target=info.get("target", target), backup=info.get("backup"),
                job=info.get("job"), request_id=caller.request_id,
                remote=caller.remote, method=caller.method, path=caller.path)
        except (RedisError, OSError) as exc:  # an outage: the answer says so anyway
            log.warning("could not write the audit entry for %s: Redis unreachable (%s)",
                        action, type(exc).__name__)
        except Exception:
            log.exception("could not write the audit entry for %s", action)

    def target(self, caller: Caller, target_id: str, role: Role) -> TargetConfig:
        """The configured target (404 listing the known ones), if `caller` holds `role`.
        The role is checked first: a token scoped to some targets learns nothing of the
        others, not even their names."""
        require(caller.principal, role, target_id)
        return self.s.settings.target(target_id)

    async def live_workers(self) -> int:
        """Workers that announced themselves in the last 30 s (a nonzero count is reused
        for a second; none is asked again every time)."""
        at, count = self.s.workers_seen
        if count and time.monotonic() - at < 1.0:
            return count
        count = int(await self.s.redis.zcount(self.s.keys.workers, time.time() - 30, "+inf"))
        self.s.workers_seen = (time.monotonic(), count)
        return count

    async def wait(self, job_id: str, timeout: float,
                   on_event: Callable[[Event], Awaitable[None]] | None = None) -> Job:
        """Follow the job's event stream until a terminal event or `timeout`."""
        deadline = time.monotonic() + timeout
        events = self.s.hub.follow(self.s.keys.events(job_id), "0-0", idle=1.0)
        try:
            async for ev in events:
                if ev is not None:
                    if on_event is not None:
                        await on_event(ev)
                    if ev.type in TERMINAL:
                        break
                elif (await self.s.store.get(job_id)).terminal:
                    break
                if time.monotonic() >= deadline:
                    break
        finally:
            await events.aclose()
        return await self.s.store.get(job_id)

    async def submit(self, caller: Caller, kind: JobKind, target: str, params: JobParams,
                     info: AuditInfo, *, idempotency_key: str | None = None,
                     wait: float | None = None, fail_fast: bool = False,
                     before_enqueue: Callable[[Job], Awaitable[None]] | None = None) -> Job:
        """Create (or find, by idempotency key) a job and enqueue it; with no live worker
        it is queued anyway with a warning, or refused (503) when the caller must wait."""
        from shared.queue import enqueue, stage_enqueue, wake_worker

        if kind != JobKind.STATS and not await self.live_workers():
            if fail_fast:  # a worker starting right now announces itself within 5 s
                for _ in range(25):
                    await asyncio.sleep(0.2)
                    if await self.live_workers():
                        break
                else:
                    raise Unavailable(f"no live worker: the {kind} was not started (start "
                                      "one with `safehold worker`)", code="no_worker")
            else:
                caller.warnings.append(NO_WORKER_WARNING)
        keys = self.s.keys
        job, created = await self.s.store.create(
            kind, target, params, caller.requested_by(), idempotency_key=idempotency_key,
            stage=None if before_enqueue else lambda pipe, j: stage_enqueue(pipe, keys, j))
        info["job"], info["target"] = job.id, target
        if created and before_enqueue is not None:  # it must run before a worker starts
            await before_enqueue(job)
            await enqueue(self.s.redis, keys, job)
        elif created:
            await wake_worker(self.s.redis, keys, job.id)
        if wait:
            try:
                with self.s.long_request(caller.principal.subject):
                    job = await self.wait(job.id, min(wait, MAX_WAIT))
            except TooMany:  # the job stands: answered at once (202), to be followed
                caller.warnings.append("not waited for: this caller has too many event "
                                       "streams or waiting requests open; follow the job")
        return job

    # ------------------------------------------------------------------ reads
    def targets(self, caller: Caller) -> list[dict[str, object]]:
        visible = caller.principal.targets_visible(list(self.s.settings.targets))
        return [self.s.settings.targets[t].public() for t in visible]

    async def backups(self, caller: Caller, target_id: str
                      ) -> tuple[list[dict[str, object]], list[str]]:
        """The target's backups (damaged ones flagged) and the destinations that did not
        answer; 503 `storage_unavailable` when none does."""
        target = self.target(caller, target_id, Role.VIEWER)
        found, unavailable = await self.s.catalog.listing(target.id)
        return [backup_view(m) for m in found], unavailable

    # ------------------------------------------------------------------ reads
    async def jobs(self, caller: Caller, *, target: str | None, status: str | None,
                   kind: str | None, limit: int, before: str | None) -> list[Job]:
        """Jobs the caller may see, newest first (`before`: the page after that job)."""
        p = caller.principal
        if target is not None:
            require(p, Role.VIEWER, target)
        visible = set(p.targets_visible(list(self.s.settings.targets)))
        return await self.s.store.list_jobs(target=target, status=status, kind=kind,
                                            limit=limit, targets=visible, before=before)

    def _admin_of(self, caller: Caller) -> set[str] | None:
        """The targets the caller administers (None: all of them, and beyond)."""
        p = caller.principal
        if p.global_role >= Role.ADMIN and p.restricted_to is None:
            return None
        return {t for t in self.s.settings.targets if p.role_for(t) >= Role.ADMIN}

    async def audit_entries(self, caller: Caller, *, limit: int, before: str | None,
                            **filters: str | None) -> list[dict[str, object]]:
        """The audit trail, newest first, of the targets the caller administers."""
        return await self.s.audit.query(limit=limit, targets=self._admin_of(caller),
                                        before=before, **filters)

    async def schedules(self, caller: Caller) -> list[dict[str, object]]:
        """Each visible target's schedule: next run, last slot and job, its outcome."""
        from datetime import UTC, datetime

        from shared import schedules

        s = self.s
        now = datetime.now(UTC)
        out = []
        for tid in caller.principal.targets_visible(list(s.settings.targets)):
            t = s.settings.targets[tid]
            state = await rcmd.hgetall_text(s.redis, s.keys.schedule(tid))
            entry: dict[str, object] = {
                "target": tid, "schedule": t.schedule or None, "timezone": t.timezone,
                "catch_up": t.catch_up, "retention": t.retention.public(),
                "next_run": None, "last_slot": state.get("last_slot"),
                "last_job": state.get("last_job"), "last_status": None,
                "missed_since": state.get("missed_alerted")}  # an open missed-run alert
            if t.schedule:
                tz = schedules.zone(t.timezone, "timezone")
                entry["next_run"] = schedules.next_due(
                    t.schedule, tz, now, schedules.jitter(tid, t.schedule_jitter)).isoformat()
            if (last := state.get("last_job")) and (job := await s.store.find(last)):
                entry["last_status"] = job.status
                entry["last_error"] = job.error["code"] if job.error else None
            out.append(entry)
        return out

    async def destinations(self, caller: Caller) -> list[dict[str, object]]:
        """Destinations' health; a token admin of some targets only sees those targets
        (names, counts and bytes of the others stay hidden)."""
        health = await self.s.catalog.health()
        mine = self._admin_of(caller)
        if mine is not None:
            for d in health:
                listed = d.get("targets")
                d["targets"] = [t for t in listed if t in mine] if isinstance(listed, list) \
                    else []
                for key in ("backups", "bytes"):  # totals over targets it may not see
                    if key in d:
                        d[key] = None
        return health

    async def download_source(self, caller: Caller, target_id: str, file: str
                              ) -> tuple[BackupStore, naming.BackupName, ManifestDoc]:
        """Where a download reads from: the first destination (in read order) holding a
        usable copy, with the name and its manifest (operator: a download is the data)."""
        target = self.target(caller, target_id, Role.OPERATOR)
        name = naming.parse(file)
        store, manifest = (await self.s.catalog.copies(target.id, name))[0]
        return store, name, manifest

    async def retention_preview(self, caller: Caller, target_id: str) -> dict[str, object]:
        """What a prune would delete now on each destination, and why the rest stays —
        read from the listings, nothing deleted, no job (the page shows it)."""
        from datetime import UTC, datetime

        from shared import retention

        target = self.target(caller, target_id, Role.VIEWER)
        now = datetime.now(UTC)
        per_destination: dict[str, object] = {}
        out: dict[str, object] = {"target": target.id, "policy": target.retention.public(),
                                  "destinations": per_destination}
        for store in self.s.catalog.stores_of(target):
            try:
                manifests = await store.list_manifests(target.id)
            except Exception as exc:  # one unreachable destination: said, not fatal
                per_destination[store.name] = {"error": type(exc).__name__}
                continue
            policy = store.config.retention or target.retention
            decisions = retention.plan_destination(manifests, policy, now, target.timezone)
            per_destination[store.name] = {
                "policy": policy.public(),
                "delete": [d.public() for d in decisions if not d.keep],
                "kept": sum(d.keep for d in decisions)}
        return out

    async def recovery_window(self, caller: Caller, target_id: str) -> dict[str, object]:
        """A PITR target's window (api.recovery), for viewers of the target."""
        return await recovery.window_of(self.s, self.target(caller, target_id, Role.VIEWER))

    async def manifest(self, target: str, file: str
                       ) -> tuple[naming.BackupName, ManifestDoc]:
        """A client-named backup: parsed by the grammar (400), then looked up (404)."""
        name = naming.parse(file)
        return name, await self.s.catalog.manifest(target, name)

    async def backup(self, caller: Caller, target_id: str, file: str) -> dict[str, object]:
        target = self.target(caller, target_id, Role.VIEWER)
        return backup_view((await self.manifest(target.id, file))[1])

    async def backup_contents(self, caller: Caller, target_id: str, file: str
                              ) -> dict[str, object]:
        """What the backup holds, from its manifest (shared.contents), for viewers."""
        target = self.target(caller, target_id, Role.VIEWER)
        return contents((await self.manifest(target.id, file))[1])

    async def job(self, caller: Caller, job_id: str, role: Role = Role.VIEWER) -> Job:
        job = await self.s.store.get(job_id)
        if caller.principal.role_for(job.target) < Role.VIEWER:
            # a job of a target the caller may not see does not exist for it (a 403 would
            # name that target)
            raise NotFound(f"no job '{job_id}'", code="job_not_found")
        require(caller.principal, role, job.target)
        return job

    # ------------------------------------------------------------------ jobs
    async def start_backup(self, caller: Caller, target_id: str, *, compress: bool | None = None,
                           note: str = "", fmt: str | None = None, use_apoc: bool = False,
                           idempotency_key: str | None = None, wait: float | None = None,
                           fail_fast: bool = False) -> Job:
        async with self.audited(caller, "create_backup", target_id, {}) as info:
            target = self.target(caller, target_id, Role.OPERATOR)
            if len(note) > 500:
                raise BadRequest("note is longer than 500 characters", code="invalid_body")
            params: JobParams = {
                "compress": target.compress if compress is None else compress, "note": note}
            if fmt is not None:
                formats = ENGINE_FORMATS.get(target.engine, ())
                if fmt not in formats:
                    known = any(fmt in f for f in ENGINE_FORMATS.values())
                    raise (Unprocessable if known else BadRequest)(
                        f"format {fmt!r} is not offered for {target.engine} "
                        f"(one of: {', '.join(formats) or 'none'})", code="invalid_body")
                params["format"] = fmt
            if use_apoc:
                if target.engine != "neo4j":
                    raise Unprocessable("use_apoc applies to neo4j targets only",
                                        code="invalid_body")
                params["use_apoc"] = True
            return await self.submit(caller, JobKind.BACKUP, target.id, params, info,
                                     idempotency_key=idempotency_key, wait=wait,
                                     fail_fast=fail_fast)

    async def start_restore(self, caller: Caller, target_id: str, file: str, *,
                            safety: bool = True, identity: str | None = None,
                            terminate: bool = False, roles: str | None = None,
                            owner_map: Mapping[str, str] | None = None,
                            database: str | None = None, into_database: str | None = None,
                            replace: bool = False, tables: list[str] | None = None,
                            into_target: str | None = None, keys: list[str] | None = None,
                            schemas: list[str] | None = None,
                            idempotency_key: str | None = None, wait: float | None = None,
                            fail_fast: bool = False, expect_sha256: str | None = None) -> Job:
        """A restore job bound to the backup's sha256 as it is now (or `expect_sha256`, what
        the caller was shown): the worker refuses a file that no longer matches."""
        # recorded under the target whose data it changes (into_target: the destination;
        # the words name both)
        async with self.audited(caller, "create_restore", into_target or target_id,
                                 {"backup": file}) as info:
            target = self.target(caller, target_id, Role.OPERATOR)
            dest = self.destination(caller, target, into_target)
            scope = scope_params(self.s.settings, target, into_database, replace, tables, dest,
                                 keys, schemas)
            if roles is not None and roles not in ("create", "skip", "map"):
                raise BadRequest("roles must be \"create\", \"map\" or \"skip\"",
                                 code="invalid_body")
            if (roles == "map") != (owner_map is not None) or owner_map is not None and not (
                    0 < len(owner_map) <= 1000 and all(
                        isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 63
                        and 0 < len(v) <= 63 and "\0" not in k + v
                        for k, v in owner_map.items())):
                raise BadRequest("owner_map goes with \"roles\": \"map\": an object of "
                                 "role names, {\"old\": \"new\"} (1-63 characters each)",
                                 code="invalid_body")
            if roles is not None and target.engine not in ("postgresql", "mysql") or \
                    roles == "map" and target.engine != "postgresql":
                which = ("roles = \"map\" applies to PostgreSQL" if roles == "map" else
                         "roles applies to PostgreSQL and MySQL/MariaDB")
                raise Unprocessable(f"{which} targets (not yet to {target.engine})",
                                    code="invalid_body")
            parsed = naming.parse(file)
            info["backup"] = scope_words(parsed.filename, scope, dest.id)
            if parsed.engine != target.engine:  # the name proves the engine
                raise BadRequest(f"{parsed.filename} is a {parsed.engine} backup; "
                                 f"target '{target.id}' is {target.engine}",
                                 code="engine_mismatch")
            name, manifest = await self.manifest(target.id, file)
            if expect_sha256 is not None and manifest["sha256"] != expect_sha256:
                raise Conflict(f"{name.filename} changed since it was shown (its sha256 is "
                               "not the one planned); look at it again",
                               code="backup_changed")
            # bound to the bytes the caller saw: a file replaced while the job waits in the
            # queue is refused by the worker, never restored under this name
            params: JobParams = {"backup": name.filename, "create_safety_backup": safety,
                                 "sha256": manifest["sha256"], **scope}
            check_tables(params, manifest)
            if terminate:
                if target.engine not in ("postgresql", "mysql"):
                    raise Unprocessable("terminate_connections applies to PostgreSQL and "
                                        f"MySQL/MariaDB targets, not {target.engine}",
                                        code="invalid_body")
                params["terminate_connections"] = True
            if database is not None:  # one database of a backup set
                entries = backup_sets.member_entries(manifest)
                if entries is None:
                    raise Unprocessable(f"{name.filename} is not a backup set: \"database\" "
                                        "picks one database of a server target's backup",
                                        code="invalid_body")
                members = [m.get("database") for m in entries]
                if database not in members:
                    raise NotFound(f"the backup set {name.filename} has no database "
                                   f"{database!r} (it holds: "
                                   f"{', '.join(str(m) for m in members)})",
                                   code="database_missing")
                params["database"] = database
            if roles is not None:
                params["roles"] = roles
            if owner_map is not None:
                params["owner_map"] = dict(owner_map)
            return await self.submit(caller, JobKind.RESTORE, dest.id, params, info,
                                     idempotency_key=idempotency_key, wait=wait,
                                     fail_fast=fail_fast,
                                     before_enqueue=await self._sealer(identity, params))

    async def start_pitr_restore(self, caller: Caller, target_id: str, point_in_time: str,
                                 *, safety: bool = True, identity: str | None = None,
                                 terminate: bool = False, into_database: str | None = None,
                                 replace: bool = False, tables: list[str] | None = None,
                                 into_target: str | None = None,
                                 idempotency_key: str | None = None,
                                 wait: float | None = None) -> Job:
        """A restore to an instant of the target's recovery window ("latest": its end);
        an instant outside it is refused (422 outside_window, with the window).
        `into_target`: the target's state then, loaded into another target of its engine
        (the job runs there: its lock, credentials and safety backup)."""
        async with self.audited(caller, "create_restore", into_target or target_id,
                                 {}) as info:
            target = self.target(caller, target_id, Role.OPERATOR)
            dest = self.destination(caller, target, into_target)
            when = recovery.within(await recovery.window_of(self.s, target), point_in_time)
            scope = scope_params(self.s.settings, target, into_database, replace, tables,
                                 dest)
            info["backup"] = scope_words(f"point in time {when or 'latest'}", scope, dest.id)
            params: JobParams = {"point_in_time": when or "latest",
                                 "create_safety_backup": safety, **scope}
            if terminate:
                params["terminate_connections"] = True
            return await self.submit(caller, JobKind.RESTORE, dest.id, params, info,
                                     idempotency_key=idempotency_key, wait=wait,
                                     before_enqueue=await self._sealer(identity, params))

    def destination(self, caller: Caller, target: TargetConfig, into_target: object
                     ) -> TargetConfig:
        """The target a restore goes into: `target` itself, or the one `into_target`
        names (an empty or non-text name is refused: never read as "over the source")."""
        if into_target is None:
            return target
        if not isinstance(into_target, str) or not into_target:
            raise BadRequest("into_target names another configured target",
                             code="invalid_body")
        return self.target(caller, into_target, Role.OPERATOR)

    async def _sealer(self, identity: str | None, params: JobParams
                      ) -> Callable[[Job], Awaitable[None]] | None:
        """With an identity: seal it now (refused here when it is not one, or no worker
        lives to open it) and return what stores it under the job's id before enqueueing."""
        if identity is None:
            return None
        sealed = await self.seal_identity(identity)
        params["identity_supplied"] = True

        async def seal(job: Job) -> None:
            await self.s.redis.set(self.s.keys.sealed_identity(job.id), sealed,
                                   ex=int(self.s.settings.worker.job_ttl))
        return seal

    async def seal_identity(self, identity: str) -> bytes:
        """An age identity sent with a restore is never stored or logged as such: it is
        encrypted to the ephemeral keys of the live workers (each holds its private half in
        memory only), so only a worker process alive now can open it."""
        if len(identity) > 64 * 1024:
            raise BadRequest("identity is too long", code="invalid_identity")
        codecs.load_identities(identity)  # 400 when it is not an identity
        s = self.s
        workers = [w.decode() for w in
                   await s.redis.zrangebyscore(s.keys.workers, time.time() - 30, "+inf")]
        keys = []
        if workers:
            found = await rcmd.hmget(s.redis, s.keys.worker_keys, workers)
            keys = [k for k in found if k]
        if not keys:
            raise Unavailable("no live worker to hand the identity to: start one with "
                              "`safehold worker`", code="no_worker")
        import pyrage

        recipients = [pyrage.x25519.Recipient.from_str(k.decode()) for k in keys]
        return bytes(await asyncio.to_thread(pyrage.encrypt, identity.encode(), recipients))

    async def start_verify(self, caller: Caller, target_id: str, backup: str | None = None,
                           *, point_in_time: str | None = None, identity: str | None = None,
                           idempotency_key: str | None = None,
                           wait: float | None = None) -> Job:
        """A drill; `identity` opens an encrypted backup whose key the worker does not hold
        (sealed to the live workers, as for a restore). `point_in_time` (a PITR target's
        instant, "latest" or "random"): a PITR drill of that instant instead of a backup."""
        async with self.audited(caller, "verify", target_id,
                                {} if backup is None else {"backup": backup}) as info:
            target = self.target(caller, target_id, Role.OPERATOR)
            params: JobParams = {}
            if backup is not None and point_in_time is not None:
                raise BadRequest("a drill is of a \"backup\" or of a \"point_in_time\", "
                                 "not both", code="invalid_body")
            if backup is not None:  # "" is a bad name, not "the newest"
                name, _ = await self.manifest(target.id, backup)
                params["backup"] = info["backup"] = name.filename
            if point_in_time is not None:
                window = await recovery.window_of(self.s, target)
                when = recovery.within(window, "latest" if point_in_time == "random"
                                       else point_in_time)
                params["point_in_time"] = "random" if point_in_time == "random" \
                    else when or "latest"
                info["backup"] = f"point in time {params['point_in_time']}"
            return await self.submit(caller, JobKind.VERIFY, target.id, params, info,
                                     idempotency_key=idempotency_key, wait=wait,
                                     before_enqueue=await self._sealer(identity, params))

    async def upload(self, caller: Caller, target_id: str, receive: Receive
                     ) -> ManifestDoc:
        """An uploaded backup file, received by `receive`, checked and stored like a
        backup (operator on the target; audited as upload_backup)."""
        async with self.audited(caller, "upload_backup", target_id, {}) as info:
            target = self.target(caller, target_id, Role.OPERATOR)
            manifest = await store_upload(self.s, target, receive, caller.requested_by())
            info["backup"] = manifest["filename"]
            return manifest

    async def start_prune(self, caller: Caller, target_id: str, *, dry_run: bool,
                          idempotency_key: str | None = None,
                          wait: float | None = None) -> Job:
        async with self.audited(caller, "prune", target_id, {}) as info:
            target = self.target(caller, target_id, Role.ADMIN)
            if not self.s.settings.retains(target) and not dry_run:
                raise Unprocessable(f"target '{target.id}' has no retention policy: "
                                    "nothing would be deleted (set [targets.<id>.retention])",
                                    code="no_retention")
            return await self.submit(caller, JobKind.PRUNE, target.id,
                                     {"dry_run": dry_run, "reason": "requested"}, info,
                                     idempotency_key=idempotency_key, wait=wait)

    async def cancel(self, caller: Caller, job_id: str) -> Job:
        async with self.audited(caller, "cancel_job", None, {"job": job_id}) as info:
            job = await self.job(caller, job_id, Role.OPERATOR)
            info["target"] = job.target
            if not job.terminal and not job.cancellable:
                raise Conflict("this restore is changing the database and cannot be "
                               f"cancelled safely now ({job.restore_state}); it either "
                               "completes or rolls back by itself", code="restore_running")
            return await self.s.outcomes.cancel(job.id)

    async def delete_backup(self, caller: Caller, target_id: str, file: str) -> str:
        """Delete a backup everywhere unless a restore of it is queued or running (409)."""
        async with self.audited(caller, "delete_backup", target_id,
                                 {"backup": file}) as info:
            target = self.target(caller, target_id, Role.ADMIN)
            name = naming.parse(file)
            info["backup"] = name.filename
            # a damaged backup may be deleted too (its manifest is then only looked at)
            manifest = (await self.s.catalog.copies(target.id, name,
                                                   include_damaged=True))[0][1]
            for job in await self.s.store.active_for_target(target.id):
                if job.kind == JobKind.RESTORE and job.params.get("backup") == name.filename:
                    raise Conflict(f"backup {name.filename} is being restored by job "
                                   f"{job.id}", code="backup_in_use")
                made_for = manifest.get("parent") == job.id or name.filename == \
                    job.safety_backup
                if job.kind == JobKind.RESTORE and made_for:
                    raise Conflict(f"{name.filename} is the safety backup of restore job "
                                   f"{job.id}, which is still running", code="backup_in_use")
            await self.s.catalog.delete(target.id, name)
            await stats.catalog_changed(self.s.redis, self.s.keys)
            return name.filename
