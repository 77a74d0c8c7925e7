"""The backup and restore procedures, each readable top to bottom.

Backup:  dump -> [gzip] -> sha256 -> temp file -> atomic publish with manifest.
Restore: verify (checksum, inflation bound, content) -> safety backup -> load -> on failure,
         say exactly what state the database is in, rolling back from the safety backup
         when the engine cannot promise the database was left unchanged.

The job lifecycle around them (transitions, heartbeat, cancel) lives in `worker.runner`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from datetime import UTC, datetime
from typing import Any

from shared import formats, naming
from shared.codecs import plain_limit
from shared.config import Settings, TargetConfig
from shared.errors import (
    BadRequest,
    EngineError,
    IntegrityError,
    PipelineError,
    RestoreFailed,
    SafeholdError,
    SafetyBackupFailed,
)
from shared.jobs import Job, JobStore, now_iso, undo_hint
from shared.storage import LocalStorage
from worker import pipeline
from worker.engines import Engine
from worker.progress import Progress


class Procedures:
    def __init__(self, settings: Settings, store: JobStore, storage: LocalStorage) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage

    # ----------------------------------------------------------------- backup
    async def backup(self, job: Job, target: TargetConfig, engine: Engine, progress: Progress,
                     *, kind: str, compress: bool, note: str = "",
                     parent: str | None = None) -> dict[str, Any]:
        """Dump -> [gzip] -> sha256 -> temp file -> atomic publish with manifest."""
        started = datetime.now(UTC)
        t0 = time.monotonic()
        level = self.settings.worker.compress_level
        temp = await asyncio.to_thread(self.storage.create_temp, target.id, job.id)
        await self.store.set_fields(job.id, temp_path=str(temp.path))

        try:
            options = {k: job.params[k] for k in ("format", "use_apoc") if job.params.get(k)}
            async with engine.dump(target, progress, options) as dump:
                out = await pipeline.store(dump.chunks, temp, compress=compress, level=level,
                                           on_bytes=progress.add_bytes)
            await asyncio.to_thread(temp.finish)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(temp.discard))
            raise
        progress.phase = "publishing"
        name = naming.new_name(kind, engine.name, started, compressed=compress,
                               ext=dump.info.pop("extension", engine.extension))
        manifest = {
            "engine": engine.name,
            "kind": kind,
            "created_at": started.isoformat().replace("+00:00", "Z"),
            "finished_at": now_iso(),
            "duration_s": round(time.monotonic() - t0, 3),
            "size_bytes": out["size_bytes"],
            "raw_bytes": out["raw_bytes"],
            "sha256": out["sha256"],
            "compression": ({"algorithm": "gzip", "implementation": pipeline.GZIP_IMPL,
                             "level": level} if compress else None),
            "encryption": None,
            **dump.info,
            "warnings": progress.warnings or None,
            "requested_by": job.requested_by,
            "job": job.id,
            "parent": parent,
            "note": note or None,
        }
        publishing = asyncio.ensure_future(
            asyncio.to_thread(self.storage.publish, target.id, temp.path, name, manifest))
        try:
            final = await asyncio.shield(publishing)
        except asyncio.CancelledError:
            # cancelled while publishing: let it finish, then take it back out
            final = await publishing
            await asyncio.to_thread(self.storage.delete, target.id, final)
            raise
        await self.store.set_fields(job.id, temp_path="")
        return {
            "filename": final.filename,
            "kind": kind,
            "size_bytes": out["size_bytes"],
            "raw_bytes": out["raw_bytes"],
            "sha256": out["sha256"],
            "compressed": compress,
            "duration_s": manifest["duration_s"],
            "warnings": progress.warnings or None,
        }

    # ----------------------------------------------------------------- restore
    async def restore(self, job: Job, target: TargetConfig, engine: Engine,
                      progress: Progress) -> dict[str, Any]:
        """Verify -> safety backup -> clean restore -> (on failure) automatic rollback."""
        name = naming.parse(str(job.params.get("backup", "")))
        manifest = await asyncio.to_thread(self.storage.manifest, target.id, name)
        if manifest.get("engine") != target.engine:
            raise BadRequest(f"backup {name.filename} is a {manifest.get('engine')} backup; "
                             f"target '{target.id}' is {target.engine}",
                             code="engine_mismatch")
        make_safety = bool(job.params.get("create_safety_backup", True))
        progress.plan = ({"verifying": (0, 5), "safety_backup": (5, 40), "restoring": (40, 100)}
                         if make_safety else {"verifying": (0, 5), "restoring": (5, 100)})
        # what the file really holds (checked), not what its manifest says, drives the load
        manifest = {**manifest, **await self._verify(target, engine, name, manifest, progress)}
        safety = await self._safety_backup(job, target, engine, name, progress) \
            if make_safety else None
        t0 = time.monotonic()
        warnings_before = len(progress.warnings)
        try:
            await self._load(job, target, engine, name, manifest, progress)
        except (EngineError, PipelineError, BadRequest) as exc:
            raise await self._after_failed_restore(
                job, target, engine, exc, safety, progress, manifest) from exc
        except Exception as exc:  # a bug mid-load: still say what state the database is in
            error = RestoreFailed(f"{type(exc).__name__}: {exc}", code="internal_error")
            raise await self._after_failed_restore(
                job, target, engine, error, safety, progress, manifest) from exc
        return {"restored": name.filename, "safety_backup": safety,
                "raw_bytes": manifest.get("raw_bytes"),
                "duration_s": round(time.monotonic() - t0, 3),
                "warnings": progress.warnings[warnings_before:] or None}

    def _limit(self, manifest: dict[str, Any]) -> int:
        limits = self.settings.limits
        declared = manifest.get("raw_bytes")
        return plain_limit(int(manifest.get("size_bytes") or 0),
                           max_bytes=limits.max_restore_bytes, ratio=limits.max_expansion_ratio,
                           declared=int(declared) if isinstance(declared, int) else None)

    async def _verify(self, target: TargetConfig, engine: Engine, name: naming.BackupName,
                      manifest: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """The stored bytes match the manifest's sha256. An engine that cannot load inside
        one transaction also gets the whole content checked here (inflation bound, only
        what its restore may run), before anything is touched: same checks as uploads."""
        progress.set_phase("verifying", bytes_total=manifest.get("size_bytes"))
        path = self.storage.path_of(target.id, name)
        expected = str(manifest.get("sha256"))
        if not engine.atomic_restore:
            try:
                facts = await asyncio.to_thread(functools.partial(
                    formats.validate, engine.name, path, name.compressed,
                    limit=self._limit(manifest), expect_sha256=expected,
                    on_stored=progress.add_bytes))
                formats.check_scope(engine.name, target.url or "", facts)
            except SafeholdError as exc:
                # damaged bytes often break gzip before the digest is reached: the checksum
                # says what happened
                if isinstance(exc, IntegrityError) or await asyncio.to_thread(
                        pipeline.sha256_file, path) != expected:
                    raise self._mismatch(name) from None
                raise RestoreFailed(f"the backup {name.filename} was refused: {exc.message}",
                                    database_unchanged=True, code=exc.code) from None
            return {k: facts[k] for k in ("databases",) if k in facts}
        digest = await asyncio.to_thread(pipeline.sha256_file, path, progress.add_bytes)
        if digest != expected:
            raise self._mismatch(name)
        return {}

    @staticmethod
    def _mismatch(name: naming.BackupName) -> IntegrityError:
        return IntegrityError(f"backup {name.filename} does not match its manifest's sha256; "
                              "refusing to restore, nothing was touched")

    async def _safety_backup(self, job: Job, target: TargetConfig, engine: Engine,
                             restoring: naming.BackupName, progress: Progress) -> str:
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
        return safety

    async def _load(self, job: Job, target: TargetConfig, engine: Engine,
                    name: naming.BackupName, manifest: dict[str, Any],
                    progress: Progress, *, rollback: bool = False) -> None:
        progress.set_phase("restoring", bytes_total=manifest.get("raw_bytes"))
        if not rollback:  # a rollback stays `rolling_back`: its outcome is never "unchanged"
            await progress.enter_stage("uncommitted" if engine.atomic_restore else "partial")
        chunks = pipeline.read_stored(
            self.storage.path_of(target.id, name), decompress=name.compressed,
            limit=self._limit(manifest), expect_sha256=str(manifest.get("sha256")))
        try:
            await engine.restore(target, chunks, progress, clean=True, manifest=manifest)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _after_failed_restore(self, job: Job, target: TargetConfig, engine: Engine,
                                    exc: SafeholdError, safety: str | None,
                                    progress: Progress,
                                    failed: dict[str, Any]) -> RestoreFailed:
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
                smanifest = await asyncio.to_thread(self.storage.manifest, target.id, sname)
                smanifest = {**smanifest,
                             **await self._verify(target, engine, sname, smanifest, progress)}
                # the failed load may have written where the safety backup has nothing (an
                # empty database then): the rollback's clean covers those too
                smanifest["also_clean"] = failed.get("databases") or []
                await self._load(job, target, engine, sname, smanifest, progress,
                                 rollback=True)
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

