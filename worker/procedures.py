"""The backup and restore procedures, each readable top to bottom.

Backup:  dump -> codec chain (gzip|zstd, age) -> sha256 -> every destination of the target
         at once -> read-back check -> manifests last.
Restore: verify (checksum, inflation bound, content) -> safety backup -> load -> on failure,
         say exactly what state the database is in, rolling back from the safety backup
         when the engine cannot promise the database was left unchanged.

The job lifecycle around them (transitions, heartbeat, cancel) lives in `worker.runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from shared import backup_sets, codecs, formats, manifests, naming, retention
from shared.codecs import plain_limit
from shared.config import Settings, TargetConfig
from shared.errors import (
    BadRequest,
    Conflict,
    EngineError,
    IntegrityError,
    NotFound,
    PipelineError,
    RestoreFailed,
    SafeholdError,
    SafetyBackupFailed,
    Unavailable,
)
from shared.jobs import Job, JobKind, JobStatus, JobStore, now_iso, undo_hint
from shared.naming import ENGINE_FORMATS
from shared.outage import JobTakenOver, RedisUnavailable
from shared.storage.base import BackupStore
from shared.storage.catalog import BlockingStream, Catalog
from worker import pipeline
from worker.engines import Drill, Drillable, Engine, RestoreOptions, RowCounting, server_sets
from worker.progress import Progress

log = logging.getLogger("safehold.worker")


async def _counted(chunks: AsyncIterator[bytes], counter: Any) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        counter.feed(chunk)
        yield chunk


def _plain(name: str) -> str:
    """A table name without identifier quoting (dump-time estimates are unquoted)."""
    return name.replace('"', "").replace("`", "")


# keys a worker once set, in memory, on the manifest a load is given (its control data now
# travels in RestoreOptions and the windows argument): one found in a stored manifest
# (anyone able to write a .json beside a backup) is still dropped, never passed on
_IN_MEMORY_ONLY = ("also_clean", "plain_windows")


async def _whole(chunks: AsyncIterator[bytes]
                 ) -> AsyncIterator[tuple[str | None, AsyncIterator[bytes]]]:
    """A one-database backup, shaped like a set's members."""
    yield None, chunks


def _checked(stored: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """The manifest a load goes by: the stored one, with what the check found in the file
    over it, and none of the keys a worker alone may set."""
    return {**{k: v for k, v in stored.items() if k not in _IN_MEMORY_ONLY}, **facts}


# a drill stopped by these proved nothing about the backup: `not_run`, never `failed`
DRILL_NOT_RUN = frozenset({"identity_required", "wrong_identity", "drill_unavailable"})

class Procedures:
    def __init__(self, settings: Settings, store: JobStore, catalog: Catalog) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog

    async def still_ours(self, job: Job) -> None:
        """JobTakenOver unless the job is still running on the worker that started it (a
        worker cut off from Redis alone is taken for dead, and its job failed, by others;
        waiting for Redis here is ridden out like any of the job's Redis calls)."""
        current = await self.store.find(job.id)
        if current is None or current.status != JobStatus.RUNNING or current.worker != job.worker:
            log.warning("job %s was taken for lost by others while this worker could not "
                        "reach Redis; its work stops here", job.id)
            raise JobTakenOver(
                f"job {job.id} was taken for lost while this worker could not reach Redis "
                f"({'gone' if current is None else current.status}); nothing was kept")

    # ----------------------------------------------------------------- backup
    def chain(self, target: TargetConfig, compress: bool = True) -> list[codecs.Step]:
        """The codec chain of a new backup of `target` (with the recipients' keys, which
        `codecs.recorded` leaves out of the manifest)."""
        chain: list[codecs.Step] = []
        algorithm = target.compression if target.compression != "none" else "gzip"
        if compress and algorithm == "gzip":
            level = target.compression_level
            chain.append({"codec": "gzip", "implementation": codecs.GZIP_IMPL,
                          "level": self.settings.worker.compress_level if level is None
                          else level})
        elif compress and algorithm == "zstd":
            cores = os.cpu_count() or 1
            chain.append({"codec": "zstd", "level": target.compression_level or 3,
                          "threads": min(4, cores - 1) if cores > 1 else 0})
        if target.encryption is not None:
            keys = target.encryption.recipient_lines()
            chain.append({"codec": "age",
                          "recipients": [codecs.recipient_fingerprint(k) for k in keys],
                          "recipient_keys": keys})
        return chain

    async def backup(self, job: Job, target: TargetConfig, engine: Engine, progress: Progress,
                     *, kind: str, compress: bool, note: str = "",
                     parent: str | None = None) -> dict[str, Any]:
        """Dump -> codec chain -> sha256 -> every destination -> read-back -> manifests."""
        started = datetime.now(UTC)
        t0 = time.monotonic()
        chain = self.chain(target, compress)
        # encoders first: recipients that cannot be loaded fail the backup before a byte
        # is written anywhere (never stored unencrypted)
        stages = codecs.encoders(chain)
        options = {k: job.params[k] for k in ("format", "use_apoc") if job.params.get(k)}
        fmt = options.get("format")
        ext = fmt if fmt in ENGINE_FORMATS.get(engine.name, ()) else engine.extension

        async def record_handles(handles: list[str]) -> None:
            await self.store.set_fields(job.id, temp_handles=" ".join(handles))

        try:
            name = await self.catalog.reserve(target, naming.new_name(
                kind, engine.name, started, codecs=[s["codec"] for s in chain], ext=ext),
                claim=self.store.name_claimer(target.id, job.id))
            fan = await self.catalog.begin(target, name, job.id, on_handles=record_handles)
        except BaseException:
            for stage in stages:
                if close := getattr(stage, "close", None):
                    await asyncio.to_thread(close)
            raise
        try:
            counter = engine.row_counter() if isinstance(engine, RowCounting) else None
            ratio = await self._learned_ratio(target)
            async with engine.dump(target, progress, options) as dump:
                if "set" in dump.info:  # a server target counts each database apart
                    counter = None
                estimate = progress.bytes_total  # the engine's (on-disk) size estimate
                if estimate:
                    # dump bytes per estimated byte, learned from the previous backup
                    progress.bytes_total = max(1, int(estimate * (ratio or 1.0)))
                    dump.info["size_estimate"] = {"bytes": estimate, "ratio_used": ratio}
                chunks = dump.chunks if counter is None else _counted(dump.chunks, counter)
                out = await pipeline.store(chunks, fan, stages, on_bytes=progress.add_bytes)
            if counter is not None:
                dump.info.update(counter.result())
            progress.phase = "publishing"
            outcomes = await fan.finish(out["size_bytes"], out["sha256"])
        except BaseException:
            await asyncio.shield(fan.abort())
            raise
        manifest = manifests.Manifest(
            name=name, target=target.id, created_at=started, finished_at=datetime.now(UTC),
            size_bytes=out["size_bytes"], sha256=out["sha256"], raw_bytes=out["raw_bytes"],
            chain=chain,
            destinations=outcomes, requested_by=job.requested_by, note=note,
            facts=dump.info, dump=manifests.DumpFacts(
                duration_s=time.monotonic() - t0, job=job.id,
                parent=parent, warnings=progress.warnings))
        try:  # publishing is the backup's commit: only while the job is still this one's
            await self.still_ours(job)
        except BaseException:
            await asyncio.shield(fan.abort())
            raise
        publishing = asyncio.ensure_future(fan.publish(manifest))
        try:
            await asyncio.shield(publishing)
        except asyncio.CancelledError:
            # cancelled while publishing: let it finish, then take it back out
            with contextlib.suppress(Exception):
                await publishing
                await self.catalog.delete(target.id, name)
            raise
        except BaseException:
            await asyncio.shield(fan.abort())
            raise
        try:  # bookkeeping only: the backup is complete and published
            await self.store.set_fields(job.id, temp_handles="")
        except RedisUnavailable:
            log.warning("job %s: its temp handles stay recorded (Redis away)", job.id)
        stored_on = fan.live()
        if len(stored_on) < len(outcomes):  # a failure, or a manifest not written
            lost = {n: o.get("error", {}).get("message", "manifest not written")
                    for n, o in outcomes.items() if n not in stored_on}
            progress.warn(f"backup {name.filename} is stored on {', '.join(stored_on)} only; "
                          + "; ".join(f"{n} failed: {m}" for n, m in lost.items()))
        return {
            "filename": name.filename,
            "kind": kind,
            "size_bytes": out["size_bytes"],
            "raw_bytes": out["raw_bytes"],
            "sha256": out["sha256"],
            "compressed": any(s["codec"] in ("gzip", "zstd") for s in chain),
            "codecs": [s["codec"] for s in chain],
            "stored_on": stored_on,
            "destinations": outcomes,
            "partial": len(stored_on) < len(outcomes),
            "duration_s": round(manifest.dump.duration_s, 3) if manifest.dump else None,
            "warnings": progress.warnings or None,
        }

    async def _learned_ratio(self, target: TargetConfig) -> float | None:
        """Plain dump bytes per byte of the engine's estimate, from the newest backup of
        this target that recorded both (progress then follows bytes against a size that
        means something, instead of sitting at 99 %)."""
        with contextlib.suppress(Exception):
            for m in await self.catalog.list_backups(target.id):
                est = (m.get("size_estimate") or {}).get("bytes")
                if est and m.get("raw_bytes"):
                    return min(50.0, max(0.02, float(m["raw_bytes"]) / float(est)))
        return None

    # ----------------------------------------------------------------- prune
    async def prune(self, job: Job, target: TargetConfig, progress: Progress,
                    on_delete: Callable[[str, str, list[str]], Awaitable[None]]
                    ) -> dict[str, Any]:
        """Apply the target's retention on each of its destinations (regular backups by the
        policy; safety backups and uploads: younger than 7 days, or the newest, are kept).
        Runs under the target lock, so no restore of this target reads meanwhile; a backup
        a queued restore names is kept too. `dry_run` returns the plan only."""
        dry_run = bool(job.params.get("dry_run"))
        progress.set_phase("planning")
        async def named_by_jobs() -> set[str]:
            return {str(j.params.get("backup"))
                    for j in await self.store.active_for_target(target.id)
                    if j.kind in (JobKind.RESTORE, JobKind.VERIFY) and j.id != job.id}

        busy = await named_by_jobs()
        now = datetime.now(UTC)
        out: dict[str, Any] = {"dry_run": dry_run, "policy": target.retention.public(),
                               "destinations": {}}
        for store in self.catalog.stores_of(target):
            manifests = await store.list_manifests(target.id)
            mine = store.config.retention or target.retention  # a destination may keep more
            decisions = retention.plan_destination(manifests, mine, now, target.timezone)
            for d in decisions:
                if not d.keep and d.filename in busy:
                    d.keep, d.reasons = True, ["a queued restore names it"]
            deleted = []
            if not dry_run:
                progress.set_phase("deleting")
                for d in decisions:
                    if d.keep:
                        continue
                    if d.filename in await named_by_jobs():  # submitted while we planned
                        d.keep, d.reasons = True, ["a queued restore names it"]
                        continue
                    try:
                        await store.delete(target.id, d.filename)
                    except NotFound:
                        continue
                    deleted.append(d.filename)
                    await on_delete(store.name, d.filename, d.reasons)
            out["destinations"][store.name] = {
                "policy": mine.public(),
                "plan": [d.public() for d in decisions],
                "kept": sum(d.keep for d in decisions),
                "deleted": deleted if not dry_run else
                [d.filename for d in decisions if not d.keep]}
        return out

    # ----------------------------------------------------------------- drill
    async def verify(self, job: Job, target: TargetConfig, engine: Engine,
                     progress: Progress, supplied: Sequence[Any] = ()) -> dict[str, Any]:
        """A restore drill: verify the backup (checksum, content, identity), restore it into
        a scratch place, compare exact counts with those recorded at dump time, run the
        target's `verify_checks`, time it (RTO), drop the scratch copy; the outcome goes
        into the backup's manifest. Engines without a scratch restore get the content check
        only, and the result says so (`mode`). A drill that could not run (no identity for
        an encrypted backup, a role that may not create the scratch database) is recorded
        as `not_run` with the reason: it says nothing about the backup, unlike `failed`.
        `supplied`: identities sent with this drill (sealed to the workers, as for a
        restore), tried before the worker's own."""
        wanted = job.params.get("backup")
        if wanted:
            name = naming.parse(str(wanted))
        else:
            regular = [m for m in await self.catalog.list_backups(target.id)
                       if m.get("kind") == "backup" and m.get("stored_on")]
            if not regular:
                raise NotFound(f"target '{target.id}' has no backup to verify",
                               code="backup_not_found")
            name = naming.parse(str(regular[0]["filename"]))
        copies = await self.catalog.copies(target.id, name)
        ids = [*supplied, *self.identities(target)]
        progress.plan = {"verifying": (0, 20), "restoring": (20, 90), "checking": (90, 100)}
        t0 = time.monotonic()
        drill = engine.drill if isinstance(engine, Drillable) else None
        record: dict[str, Any] = {"backup": name.filename, "job": job.id,
                                  "mode": "content-check" if drill is None
                                  else "scratch-restore"}
        try:  # any failure (a damaged copy, a failed restore) is recorded as a failed drill
            (store, manifest), facts = await self._verify(target, engine, name, copies,
                                                          progress, ids)
            record["destination"] = store.name
            windows = facts.pop("plain_windows", None)
            return await self._drill(job, target, engine, name, store,
                                     _checked(manifest, facts), drill, record, ids, progress, t0,
                                     windows)
        except SafeholdError as exc:
            if exc.code != "drill_failed":  # the restore itself failed: a failed drill too
                not_run = exc.code in DRILL_NOT_RUN
                outcome = {"outcome": "not_run", "why": exc.message[:500]} if not_run \
                    else {"outcome": "failed"}
                with contextlib.suppress(Exception):
                    await self.catalog.annotate(target.id, name, {
                        "verified_at": now_iso(), "verification": {
                            **{k: v for k, v in record.items() if k != "backup"},
                            **outcome, "error": exc.code}})
            raise

    async def _drill(self, job: Job, target: TargetConfig, engine: Engine,
                     name: naming.BackupName, store: BackupStore, manifest: dict[str, Any],
                     drill: Drill | None, record: dict[str, Any], ids: Sequence[Any],
                     progress: Progress, t0: float,
                     windows: bytes | None = None) -> dict[str, Any]:
        mismatches: dict[str, Any] = {}
        checks: list[dict[str, Any]] = []
        if drill is not None:
            # scratch copies a killed drill left: older than any verify job may run
            with contextlib.suppress(Exception):
                if swept := await drill.sweep(target, self.settings.worker.restore_timeout
                                              + 600):
                    record["swept_scratch"] = swept
                    progress.warn("dropped scratch copies an interrupted drill left "
                                  "behind: " + ", ".join(swept))
            token = backup_sets.token_of(manifest)
            members = {m["database"]: m for m in backup_sets.member_entries(manifest) or []
                       if isinstance(m.get("database"), str)} if token else {}
            progress.set_phase("restoring", bytes_total=manifest.get("raw_bytes"))
            async with self._plain(store, target, name, manifest, ids, windows) as checked:
                parts = _whole(checked) if token is None else backup_sets.members(checked,
                                                                                  token)
                compared = 0
                async for database, body in parts:
                    facts = manifest if database is None else \
                        {**members.get(database, {}), "database": database}
                    where = target if database is None else \
                        server_sets.member_target(target, database)
                    found = await self._drill_one(where, engine, drill, body, facts, record,
                                                  progress, t0)
                    prefix = "" if database is None else f"{database}/"
                    mismatches.update({prefix + t: m for t, m in found["mismatches"].items()})
                    checks += [{**c, **({"database": database} if database else {})}
                               for c in found["checks"]]
                    compared += 1
                if token is not None:
                    record["databases"] = compared
                    # a set's check is about one of its databases: passed where it ran true
                    by_sql: dict[str, list[dict[str, Any]]] = {}
                    for c in checks:
                        by_sql.setdefault(c["sql"], []).append(c)
                    checks = [next((c for c in group if c["ok"]), group[0])
                              for group in by_sql.values()]
        record["duration_s"] = round(time.monotonic() - t0, 3)
        record["mismatches"] = mismatches or None
        record["checks"] = checks or None
        passed = not mismatches and all(c["ok"] for c in checks)
        record["outcome"] = "passed" if passed else "failed"
        await self.catalog.annotate(target.id, name, {
            "verified_at": now_iso(), "verification": {
                k: v for k, v in record.items() if k not in ("backup",)}})
        if not passed:
            unit = {"keys": "keys", "documents": "documents"}.get(
                str(manifest.get("exact_count_kind") or manifest.get("count_kind")), "rows")
            err = EngineError(
                f"the restore drill of {name.filename} FAILED: " + "; ".join(
                    [f"{t}: {m['restored']} {unit} restored, {m['expected']} dumped"
                     for t, m in list(mismatches.items())[:5]]
                    + [f"check failed: {c['sql']}" for c in checks if not c["ok"]]),
                code="drill_failed")
            err.details = {"verification": record}
            raise err
        return record

    async def _drill_one(self, target: TargetConfig, engine: Engine, drill: Drill,
                         chunks: AsyncIterator[bytes], manifest: dict[str, Any],
                         record: dict[str, Any], progress: Progress, t0: float
                         ) -> dict[str, Any]:
        """One database into a scratch copy: restored, counted, checked, dropped."""
        kind = str(manifest.get("count_kind", ""))
        expected = manifest.get("exact_counts") or (
            manifest.get("counts") if kind in ("rows", "keys", "documents") else None)
        # estimates (MySQL's information_schema) cannot be compared: the tables can
        names_only = expected is None and kind.endswith("_estimate")
        if names_only:
            expected = manifest.get("counts")
        mismatches: dict[str, Any] = {}
        checks: list[dict[str, Any]] = []
        async with drill.scratch(target) as scratch:
            loaded = drill.restore_filter(chunks)
            if drill.skipped:
                record["not_restored"] = drill.skipped
            await engine.restore(scratch, loaded, progress, clean=True, manifest=manifest,
                                 options=RestoreOptions(scratch=True))
            record["rto_s"] = round(time.monotonic() - t0, 3)
            record["scratch"] = drill.last_scratch
            progress.set_phase("checking")
            got = await drill.exact_counts(scratch)
            if expected is None:
                record["counts"] = "not recorded at dump time: compared nothing"
            elif names_only:
                present = {_plain(t) for t in got}
                mismatches = {t: {"expected": "present", "restored": None}
                              for t in expected if _plain(t) not in present}
                record["counts"] = ("dump-time counts are estimates: compared which "
                                    "tables exist")
                record["tables_compared"] = record.get("tables_compared", 0) + len(expected)
                record["rows_restored"] = record.get("rows_restored", 0) + sum(got.values())
            else:
                mismatches = {t: {"expected": n, "restored": got.get(t, 0)}
                              for t, n in expected.items() if got.get(t, 0) != n}
                record["counts_compared"] = record.get("counts_compared", 0) + len(expected)
                record["rows_restored"] = record.get("rows_restored", 0) + sum(got.values())
            for sql in target.verify_checks:
                try:
                    ok = await drill.check(scratch, sql)
                    checks.append({"sql": sql, "ok": ok})
                except Exception as exc:
                    checks.append({"sql": sql, "ok": False,
                                   "error": f"{type(exc).__name__}: {exc}"[:300]})
        return {"mismatches": mismatches, "checks": checks}

    # ----------------------------------------------------------------- restore
    async def restore(self, job: Job, target: TargetConfig, engine: Engine,
                      progress: Progress, identities: Sequence[Any] = ()) -> dict[str, Any]:
        """Verify -> safety backup -> clean restore -> (on failure) automatic rollback."""
        name = naming.parse(str(job.params.get("backup", "")))
        copies = await self.catalog.copies(target.id, name)
        bound = job.params.get("sha256")
        if bound:  # the bytes the caller chose at submit; the check below proves the file
            same = [(s, m) for s, m in copies if m.get("sha256") == bound]
            if not same:
                raise Conflict(
                    f"{name.filename} is no longer the backup this restore was submitted for "
                    f"(sha256 {str(bound)[:16]}… then, {str(copies[0][1].get('sha256'))[:16]}"
                    "… now): it was replaced while the job waited; nothing was changed. "
                    "Look at the backup again and submit a new restore if it is the one",
                    code="backup_changed")
            copies = same
        manifest = copies[0][1]
        if manifest.get("engine") != target.engine:
            raise BadRequest(f"backup {name.filename} is a {manifest.get('engine')} backup; "
                             f"target '{target.id}' is {target.engine}",
                             code="engine_mismatch")
        ids = list(identities) + self.identities(target)
        make_safety = bool(job.params.get("create_safety_backup", True))
        if make_safety:
            self._check_rollback_possible(target, ids)
        progress.plan = ({"verifying": (0, 5), "safety_backup": (5, 40), "restoring": (40, 100)}
                         if make_safety else {"verifying": (0, 5), "restoring": (5, 100)})
        # what the file really holds (checked), not what its manifest says, drives the load
        n0 = len(progress.warnings)
        source, facts = await self._verify(target, engine, name, copies, progress, ids)
        verify_warnings = progress.warnings[n0:]
        windows = facts.pop("plain_windows", None)
        in_file = [m.get("database") for m in facts.pop("set_members", None) or []]
        manifest = _checked(source[1], facts)
        self._check_set(target, engine, manifest, in_file)
        if len(copies) > 1 or source[0] is not copies[0][0]:
            await self.store.publish(job.id, "log", {
                "message": f"restoring {name.filename} from destination {source[0].name}"})
        safety, safety_sha256 = await self._safety_backup(job, target, engine, name, progress) \
            if make_safety else (None, None)
        t0 = time.monotonic()
        warnings_before = len(progress.warnings)
        try:
            await self._load(job, target, engine, name, source[0], manifest, progress, ids,
                             windows=windows)
        except (EngineError, PipelineError, BadRequest) as exc:
            raise await self._after_failed_restore(
                job, target, engine, exc, safety, progress, manifest, ids,
                safety_sha256) from exc
        except Exception as exc:  # a bug mid-load: still say what state the database is in
            error = RestoreFailed(f"{type(exc).__name__}: {exc}", code="internal_error")
            raise await self._after_failed_restore(
                job, target, engine, error, safety, progress, manifest, ids,
                safety_sha256) from exc
        return {"restored": name.filename, "safety_backup": safety,
                "restored_from": source[0].name,
                "raw_bytes": manifest.get("raw_bytes"),
                "duration_s": round(time.monotonic() - t0, 3),
                "warnings": verify_warnings + progress.warnings[warnings_before:] or None}

    def identities(self, target: TargetConfig) -> list[Any]:
        """The worker's age identities for `target` (encryption.identity_file), if any."""
        enc = target.encryption
        if enc is None or not enc.identity_file:
            return []
        return codecs.identities_from_file(enc.identity_file)

    def _check_rollback_possible(self, target: TargetConfig, ids: Sequence[Any]) -> None:
        """The safety backup is encrypted to the target's recipients: when none of the
        identities at hand matches one of them (age X25519 keys can be compared), a rollback
        could not decrypt it, so the restore does not start."""
        if target.encryption is None:
            return
        recipients = target.encryption.recipient_lines()
        if not recipients or not all(r.startswith("age1") for r in recipients):
            return  # SSH recipients: proven at the safety backup's verification instead
        publics = set()
        for ident in ids:
            to_public = getattr(ident, "to_public", None)
            if to_public is None:
                return  # an SSH identity: cannot be compared here
            publics.add(str(to_public()))
        if not publics & set(recipients):
            raise RestoreFailed(
                f"target '{target.id}' encrypts its safety backups to its recipients, and no "
                "identity this restore holds matches one: a rollback could not decrypt the "
                "safety backup, so the restore did not start. Set encryption.identity_file "
                "on the worker, send the identity with the restore, or restore with "
                "create_safety_backup=false", database_unchanged=True,
                code="identity_required")

    def _limit(self, manifest: dict[str, Any]) -> int:
        limits = self.settings.limits
        declared = manifest.get("raw_bytes")
        return plain_limit(int(manifest.get("size_bytes") or 0),
                           max_bytes=limits.max_restore_bytes, ratio=limits.max_expansion_ratio,
                           declared=int(declared) if isinstance(declared, int) else None)

    @staticmethod
    def _check_set(target: TargetConfig, engine: Engine, manifest: dict[str, Any],
                   in_file: list[Any]) -> None:
        """A set restores onto a server target only (and a server target takes only sets);
        its file and its manifest list the same databases, every one this target may
        write. Refused before anything changes."""
        token = backup_sets.token_of(manifest)
        if (token is not None) != target.is_set:
            kind = "a backup set of a server" if token else "the backup of one database"
            mine = "a server target" if target.is_set else "one database"
            raise RestoreFailed(f"{manifest.get('filename')} is {kind} and target "
                                f"'{target.id}' is {mine}; restore it onto a target of its "
                                "kind. Nothing was changed", database_unchanged=True,
                                code="engine_mismatch")
        if token is None:
            return
        listed = [m.get("database") for m in backup_sets.member_entries(manifest) or []]
        if in_file != listed:
            raise RestoreFailed("the set's file and its manifest list different databases "
                                f"({in_file[:10]} in the file, {listed[:10]} in the "
                                "manifest); nothing was changed", database_unchanged=True,
                                code="corrupt_backup")
        server_sets.check_members(target, engine.name, [str(n) for n in in_file])

    async def _verify(self, target: TargetConfig, engine: Engine, name: naming.BackupName,
                      copies: list[tuple[BackupStore, dict[str, Any]]], progress: Progress,
                      identities: Sequence[Any]
                      ) -> tuple[tuple[BackupStore, dict[str, Any]], dict[str, Any]]:
        """Find the first copy whose stored bytes match its manifest's sha256 (a copy that
        is missing or damaged is passed over, and said so). An engine that cannot load
        inside one transaction also gets the whole content checked here (inflation bound,
        only what its restore may run) before anything is touched: same checks as
        uploads. An encrypted backup is decrypted far enough to prove the identity."""
        progress.set_phase("verifying", bytes_total=copies[0][1].get("size_bytes"))
        problems: list[str] = []
        last: BaseException | None = None
        for store, manifest in copies:
            try:
                facts = await self._verify_copy(target, engine, name, store, manifest,
                                                progress, identities)
            except (IntegrityError, NotFound, Unavailable) as exc:
                why, last = exc.message, exc
            except SafeholdError:
                raise  # the content was refused: the same bytes are everywhere
            except Exception as exc:  # the destination failed mid-read (network, disk)
                why, last = f"{type(exc).__name__}: {exc}", exc
            else:
                return (store, manifest), facts
            problems.append(f"{store.name}: {why}")
            progress.warn(f"the copy of {name.filename} on {store.name} is unusable "
                          f"({why}); trying the next destination")
        if len(copies) == 1 and isinstance(last, SafeholdError):
            raise (self._mismatch(name) if isinstance(last, IntegrityError) else last)
        raise IntegrityError(f"no copy of backup {name.filename} is usable ("
                             + "; ".join(problems) + "); refusing to restore, nothing was "
                             "touched")

    async def _verify_copy(self, target: TargetConfig, engine: Engine,
                           name: naming.BackupName, store: BackupStore,
                           manifest: dict[str, Any], progress: Progress,
                           identities: Sequence[Any]) -> dict[str, Any]:
        expected = str(manifest.get("sha256"))
        chain = codecs.chain_of(manifest)
        loop = asyncio.get_running_loop()

        def raw() -> BlockingStream:
            return BlockingStream(store.open(target.id, name.filename), loop)

        set_token = backup_sets.token_of(manifest)
        # a set commits database by database: every byte is checked before the first
        if not engine.atomic_restore or set_token is not None:
            stream = raw()
            try:
                windows = codecs.WindowDigests()
                facts = await asyncio.to_thread(functools.partial(
                    formats.validate, engine.name, stream, chain,
                    limit=self._limit(manifest), expect_sha256=expected,
                    on_stored=progress.add_bytes, identities=identities, windows=windows,
                    set_token=set_token))
                facts["plain_windows"] = windows.finish()  # in memory only (see _load)
                formats.check_scope(engine.name, target.url or "", facts)
            except SafeholdError as exc:
                if exc.code in ("wrong_identity", "identity_required"):
                    raise RestoreFailed(exc.message, database_unchanged=True,
                                        code=exc.code) from None
                # damaged bytes often break a codec before the digest is reached: the
                # checksum says what happened
                if isinstance(exc, IntegrityError) or await self._digest(
                        store, target, name) != expected:
                    raise self._mismatch(name) from None
                raise RestoreFailed(f"the backup {name.filename} was refused: {exc.message}",
                                    database_unchanged=True, code=exc.code) from None
            finally:
                await asyncio.to_thread(stream.close)
            return {k: facts[k] for k in ("databases", "plain_windows", "set_members")
                    if k in facts}
        digest = await self._digest(store, target, name, progress.add_bytes,
                                    chain if any(s["codec"] == "age" for s in chain) else None,
                                    identities)
        if digest != expected:
            raise self._mismatch(name)
        return {}

    async def _digest(self, store: BackupStore, target: TargetConfig, name: naming.BackupName,
                      on_bytes: Callable[[int], None] | None = None,
                      probe_chain: Sequence[codecs.Step] | None = None,
                      identities: Sequence[Any] = ()) -> str:
        """sha256 of a copy's stored bytes; with `probe_chain`, its first plain block is
        decoded first, from a stream of its own (a wrong age identity fails here, before
        anything is dropped)."""
        loop = asyncio.get_running_loop()
        if probe_chain:
            probe = BlockingStream(store.open(target.id, name.filename), loop)

            def first_block() -> None:
                reader = codecs.PlainReader(probe, probe_chain, identities=identities)
                try:
                    reader.next_chunk()
                except PipelineError as exc:
                    if exc.code in ("wrong_identity", "identity_required"):
                        raise RestoreFailed(exc.message, database_unchanged=True,
                                            code=exc.code) from None
                    raise
                finally:
                    reader.close()  # stops and joins the decoder's thread

            await asyncio.to_thread(first_block)
        stream = BlockingStream(store.open(target.id, name.filename), loop)

        def run() -> str:
            reader = codecs.PlainReader(stream, [], on_stored=on_bytes)
            reader.drain_stored()
            return reader.sha256

        try:
            return await asyncio.to_thread(run)
        finally:
            await asyncio.to_thread(stream.close)

    @staticmethod
    def _mismatch(name: naming.BackupName) -> IntegrityError:
        return IntegrityError(f"backup {name.filename} does not match its manifest's sha256; "
                              "refusing to restore, nothing was touched")

    async def _safety_backup(self, job: Job, target: TargetConfig, engine: Engine,
                             restoring: naming.BackupName, progress: Progress
                             ) -> tuple[str, str]:
        """The safety backup's name and the sha256 of what this job wrote (a rollback
        loads those bytes only)."""
        progress.set_phase("safety_backup")
        try:
            made = await self.backup(job, target, engine, progress, kind="safety_backup",
                                     compress=True, note=f"before restoring {restoring.filename}",
                                     parent=job.id)
        except SafeholdError as exc:
            err = SafetyBackupFailed(
                f"the safety backup of target '{target.id}' failed, so the restore did not "
                f"start and the database is unchanged. Cause: {exc.message}. Way out: "
                "download a current backup if you can, then restore with "
                "create_safety_backup=false")
            err.details = {"database_state": "unchanged", "cause": exc.code}
            raise err from None
        safety = str(made["filename"])
        await self.store.set_fields(job.id, safety_backup=safety)
        message = f"safety backup {safety} created"
        if made.get("warnings"):
            message += " with warnings: " + "; ".join(made["warnings"])
        await self.store.publish(job.id, "log", {"message": message})
        return safety, str(made["sha256"])

    async def _load(self, job: Job, target: TargetConfig, engine: Engine,
                    name: naming.BackupName, store: BackupStore, manifest: dict[str, Any],
                    progress: Progress, identities: Sequence[Any], *,
                    rollback: bool = False, windows: bytes | None = None,
                    also_clean: tuple[str, ...] = ()) -> None:
        """Load the backup; `windows`: the digests its check recorded (what the load may
        pass on, see `pipeline.SameAsChecked`), when the engine's check read it whole;
        `also_clean`: a rollback's extra reach (RestoreOptions.also_clean)."""
        progress.set_phase("restoring", bytes_total=manifest.get("raw_bytes"))
        if not rollback:  # a rollback stays `rolling_back`: its outcome is never "unchanged"
            try:
                await progress.enter_stage("uncommitted" if engine.atomic_restore else
                                           "partial")
            except RedisUnavailable as exc:  # nothing loaded yet
                raise RestoreFailed(exc.message, database_unchanged=True,
                                    code=exc.code) from None
        async with self._plain(store, target, name, manifest, identities, windows) as chunks:
            await engine.restore(target, chunks, progress, clean=True, manifest=manifest,
                                 options=RestoreOptions(
                                     terminate=bool(job.params.get("terminate_connections")),
                                     roles=job.params.get("roles") or None,
                                     database=job.params.get("database") or None,
                                     owner_map=tuple(sorted(
                                         (job.params.get("owner_map") or {}).items())),
                                     also_clean=also_clean))

    @contextlib.asynccontextmanager
    async def _plain(self, store: BackupStore, target: TargetConfig, name: naming.BackupName,
                     manifest: dict[str, Any], identities: Sequence[Any],
                     windows: bytes | None) -> AsyncIterator[AsyncIterator[bytes]]:
        """A stored backup's plain content for a load: bounded and sha256-checked (see
        `pipeline.stored_plain`), and with `windows` (what the check before the load read)
        passed on only as those very bytes (`pipeline.SameAsChecked`); closed after."""
        chunks = pipeline.stored_plain(
            store.open(target.id, name.filename), codecs.chain_of(manifest),
            limit=self._limit(manifest), expect_sha256=str(manifest.get("sha256")),
            identities=identities)
        checked = None if windows is None else pipeline.SameAsChecked(chunks, windows)
        try:
            yield chunks if checked is None else checked
        finally:
            if checked is not None:
                await checked.aclose()
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _after_failed_restore(self, job: Job, target: TargetConfig, engine: Engine,
                                    exc: SafeholdError, safety: str | None,
                                    progress: Progress, failed: dict[str, Any],
                                    identities: Sequence[Any],
                                    safety_sha256: str | None = None) -> RestoreFailed:
        """Say exactly what state the database is in; roll back from the safety backup
        when the engine cannot promise the database was left unchanged."""
        msg = exc.message
        details: dict[str, Any] = {"safety_backup": safety, "rollback": None}
        if isinstance(exc, RestoreFailed) and exc.database_unchanged:
            details["database_state"] = "unchanged"
            text = f"{msg}. The database was left unchanged."
            if safety:
                text += f" (Safety backup {safety} was taken and kept.)"
        elif safety is None:
            details["database_state"] = "unknown"
            text = (f"{msg}. No safety backup was made (create_safety_backup=false): the "
                    "database may be partially restored.")
        else:
            progress.set_phase("rolling_back")
            await progress.enter_stage("rolling_back")
            await self.store.publish(job.id, "log", {
                "message": f"restore failed; rolling back from safety backup {safety}"})
            sname = naming.parse(safety)
            try:
                # only the bytes this job wrote: a safety backup swapped in storage
                # meanwhile is not loaded over the database
                scopies = [(st, m) for st, m in await self.catalog.copies(target.id, sname)
                           if safety_sha256 is None or m.get("sha256") == safety_sha256]
                if not scopies:
                    raise IntegrityError(f"safety backup {safety} was replaced in storage "
                                         "since this job wrote it; it is not loaded")
                (sstore, smanifest), sfacts = await self._verify(
                    target, engine, sname, scopies, progress, identities)
                swindows = sfacts.pop("plain_windows", None)
                smanifest = _checked(smanifest, sfacts)
                # the failed load may have written where the safety backup has nothing (an
                # empty database then): the rollback's clean covers those too
                await self._load(job, target, engine, sname, sstore, smanifest, progress,
                                 identities, rollback=True, windows=swindows,
                                 also_clean=tuple(str(d) for d in
                                                  failed.get("databases") or []))
            except SafeholdError as exc2:
                details["database_state"] = "unknown"
                details["rollback"] = {"status": "failed", "backup": safety,
                                       "error": exc2.to_dict()}
                text = (f"{msg}. The automatic rollback from safety backup {safety} ALSO "
                        f"failed ({exc2.message}); restore {safety} by hand.")
            else:
                details["database_state"] = "rolled_back"
                details["rollback"] = {"status": "succeeded", "backup": safety}
                text = (f"{msg}. Rolled back automatically: safety backup {safety} was "
                        "restored, so the database is as it was before this restore.")
        if safety and details["database_state"] == "unknown":
            details["undo"] = undo_hint(target.id, safety)
        err = RestoreFailed(text, code=exc.code if exc.code != "engine_error" else None)
        err.details = details
        return err

