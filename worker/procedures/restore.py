"""Restore: verify -> safety backup -> load -> on failure, say exactly what state the
database is in, rolling back from the safety backup when the engine cannot promise the
database was left unchanged."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, cast

from shared import naming
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import (
    BadRequest,
    Conflict,
    EngineError,
    IntegrityError,
    PipelineError,
    RestoreFailed,
    SafeholdError,
    SafetyBackupFailed,
)
from shared.jobs import Job, Phase, RestoreStage, undo_hint
from shared.manifests import count_in
from shared.outage import RedisUnavailable
from shared.storage.base import BackupStore
from worker.engines import Engine, RestoreOptions
from worker.procedures.backup import Backups
from worker.procedures.verify import Verification
from worker.progress import Progress


class RestoreResult(TypedDict):
    """A restore job's `result`."""

    restored: str  # the backup's file name
    safety_backup: str | None
    restored_from: str  # the destination whose copy was loaded
    raw_bytes: object  # as its manifest records it
    duration_s: float
    warnings: list[str] | None


class Restores(Verification, Backups):
    async def restore(self, job: Job, target: TargetConfig, engine: Engine,
                      progress: Progress, identities: Sequence[AgeKey] = ()) -> RestoreResult:
        """Verify -> safety backup -> clean restore -> (on failure) automatic rollback."""
        name = naming.parse(str(job.params.get("backup", "")))
        # into_target: another target's backup, loaded here with this target's credentials
        source = self.settings.target(str(job.params.get("from_target") or target.id))
        copies = await self.catalog.copies(source.id, name)
        # what is read from storage is under the source's name; what it is checked against
        # and loaded into is this target
        reading = target if source.id == target.id else dataclasses.replace(target,
                                                                            id=source.id)
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
        tables = tuple(str(t) for t in job.params.get("tables") or ())
        only = cast(Mapping[str, object], manifest).get("only_tables")
        if isinstance(only, list) and only and not tables:
            raise BadRequest(f"{name.filename} holds only some tables ("
                             + ", ".join(str(t) for t in only)[:500]
                             + "): restore it with \"tables\", never over the whole "
                             "database", code="partial_backup")
        if manifest.get("engine") != target.engine:
            raise BadRequest(f"backup {name.filename} is a {manifest.get('engine')} backup; "
                             f"target '{target.id}' is {target.engine}",
                             code="engine_mismatch")
        ids = list(identities) + self.identities(target) + (
            self.identities(source) if source.id != target.id else [])
        make_safety = bool(job.params.get("create_safety_backup", True))
        present: list[str] = []
        if tables and make_safety and (find := getattr(engine, "tables_present", None)):
            present = await find(target, tables)  # what the restore will change
            if not present:
                make_safety = False
                progress.log("none of the tables exists in the live database: no safety "
                             "backup (nothing there to keep)")
        if make_safety:
            self._check_rollback_possible(target, ids)
        progress.plan = ({Phase.VERIFYING: (0, 5), Phase.SAFETY_BACKUP: (5, 40),
                          Phase.RESTORING: (40, 100)} if make_safety else
                         {Phase.VERIFYING: (0, 5), Phase.RESTORING: (5, 100)})
        # what the file really holds (checked), not what its manifest says, drives the load
        n0 = len(progress.warnings)
        plan = await self._verify(reading, engine, name, copies, progress, ids)
        verify_warnings = progress.warnings[n0:]
        loading = plan.load_manifest()
        self._check_set(target, engine, loading, plan.databases_in_file())
        if len(copies) > 1 or plan.store is not copies[0][0]:
            await self.store.publish(job.id, "log", {
                "message": f"restoring {name.filename} from destination {plan.store.name}"})
        safety, safety_sha256 = await self._safety_backup(
            job, target, engine, name, progress, present) if make_safety else (None, None)
        t0 = time.monotonic()
        warnings_before = len(progress.warnings)
        try:
            await self._load(job, target, engine, name, plan.store, loading, progress, ids,
                             windows=plan.windows, tables=tables, stored_under=source.id)
        except (EngineError, PipelineError, BadRequest) as exc:
            raise await self._after_failed_restore(
                job, target, engine, exc, safety, progress, loading, ids,
                safety_sha256) from exc
        except Exception as exc:  # a bug mid-load: still say what state the database is in
            error = RestoreFailed(f"{type(exc).__name__}: {exc}", code="internal_error")
            raise await self._after_failed_restore(
                job, target, engine, error, safety, progress, loading, ids,
                safety_sha256) from exc
        return {"restored": name.filename, "safety_backup": safety,
                "restored_from": plan.store.name,
                "raw_bytes": loading.get("raw_bytes"),
                "duration_s": round(time.monotonic() - t0, 3),
                "warnings": verify_warnings + progress.warnings[warnings_before:] or None}

    def _check_rollback_possible(self, target: TargetConfig, ids: Sequence[AgeKey]) -> None:
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

    async def _safety_backup(self, job: Job, target: TargetConfig, engine: Engine,
                             restoring: naming.BackupName, progress: Progress,
                             tables: Sequence[str] = ()) -> tuple[str, str]:
        """The safety backup's name and the sha256 of what this job wrote (a rollback
        loads those bytes only)."""
        progress.set_phase(Phase.SAFETY_BACKUP)
        try:
            made = await self.backup(job, target, engine, progress, kind="safety_backup",
                                     compress=True, note=f"before restoring {restoring.filename}",
                                     parent=job.id, tables=tables)
        except SafeholdError as exc:
            err = SafetyBackupFailed(
                f"the safety backup of target '{target.id}' failed, so the restore did not "
                f"start and the database is unchanged. Cause: {exc.message}. Way out: "
                "download a current backup if you can, then restore with "
                "create_safety_backup=false")
            err.details = {"database_state": "unchanged", "cause": exc.code}
            raise err from None
        safety = made["filename"]
        await self.store.set_fields(job.id, safety_backup=safety)
        message = f"safety backup {safety} created"
        if warnings := made["warnings"]:
            message += " with warnings: " + "; ".join(warnings)
        await self.store.publish(job.id, "log", {"message": message})
        return safety, made["sha256"]

    async def _load(self, job: Job, target: TargetConfig, engine: Engine,
                    name: naming.BackupName, store: BackupStore, manifest: Mapping[str, object],
                    progress: Progress, identities: Sequence[AgeKey], *,
                    rollback: bool = False, windows: bytes | None = None,
                    also_clean: tuple[str, ...] = (), tables: tuple[str, ...] = (),
                    stored_under: str | None = None) -> None:
        """Load the backup; `windows`: the digests its check recorded (what the load may
        pass on, see `pipeline.SameAsChecked`), when the engine's check read it whole;
        `also_clean`: a rollback's extra reach (RestoreOptions.also_clean)."""
        progress.set_phase(Phase.RESTORING, bytes_total=count_in(manifest, "raw_bytes"))
        if not rollback:  # a rollback stays `rolling_back`: its outcome is never "unchanged"
            try:
                await progress.enter_stage(RestoreStage.UNCOMMITTED if engine.atomic_restore
                                           else RestoreStage.PARTIAL)
            except RedisUnavailable as exc:  # nothing loaded yet
                raise RestoreFailed(exc.message, database_unchanged=True,
                                    code=exc.code) from None
        reading = target if stored_under in (None, target.id) else dataclasses.replace(
            target, id=stored_under)  # another target's backup (into_target)
        async with self._plain(store, reading, name, manifest, identities, windows) as chunks:
            await engine.restore(target, chunks, progress, clean=True, manifest=manifest,
                                 options=RestoreOptions(
                                     terminate=bool(job.params.get("terminate_connections")),
                                     roles=job.params.get("roles") or None,
                                     database=job.params.get("database") or None,
                                     owner_map=tuple(sorted(
                                         (job.params.get("owner_map") or {}).items())),
                                     also_clean=also_clean, tables=tables,
                                     keys=() if rollback else tuple(
                                         str(k) for k in job.params.get("keys") or ())))

    async def _after_failed_restore(self, job: Job, target: TargetConfig, engine: Engine,
                                    exc: SafeholdError, safety: str | None,
                                    progress: Progress, failed: dict[str, Any],
                                    identities: Sequence[AgeKey],
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
            progress.set_phase(Phase.ROLLING_BACK)
            await progress.enter_stage(RestoreStage.ROLLING_BACK)
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
                splan = await self._verify(target, engine, sname, scopies, progress,
                                           identities)
                # the failed load may have written where the safety backup has nothing (an
                # empty database then): the rollback's clean covers those too
                sloading = splan.load_manifest()
                await self._load(job, target, engine, sname, splan.store,
                                 sloading, progress, identities, rollback=True,
                                 tables=tuple(str(t) for t in cast(
                                     list[object], sloading.get("only_tables") or [])),
                                 windows=splan.windows,
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
            details["undo"] = undo_hint(target.id, safety, job.params.get("into_database"),
                                        job.params.get("tables"))
        err = RestoreFailed(text, code=exc.code if exc.code != "engine_error" else None)
        err.details = details
        return err
