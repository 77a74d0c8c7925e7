"""Verify and drill: a stored backup proves itself (every copy's checksum, the inflation
bound, the content check), and a drill restores it into a scratch place and compares
exact counts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Required, TypedDict, cast

from shared import backup_sets, codecs, formats, naming
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import (
    EngineError,
    IntegrityError,
    NotFound,
    RestoreFailed,
    SafeholdError,
    Unavailable,
)
from shared.jobs import Job, Phase, now_iso
from shared.manifests import ManifestDoc, count_in
from shared.storage.base import BackupStore
from shared.storage.catalog import BlockingStream
from worker.engines import Drill, Drillable, Engine, RestoreOptions, server_sets, written
from worker.procedures.base import DRILL_NOT_RUN, ProcedureBase, RestorePlan, unquoted, whole
from worker.progress import Progress


class DrillCheck(TypedDict, total=False):
    """One of the target's `verify_checks`, run on the scratch copy."""

    sql: Required[str]
    ok: Required[bool]
    error: str  # the check itself failed to run
    database: str  # a server target's: the member it ran on


class Mismatch(TypedDict):
    """A table whose restored count is not what the dump recorded."""

    expected: int | str  # "present" when dump-time counts were estimates
    restored: int | None


class DrillFound(TypedDict):
    mismatches: dict[str, Mismatch]
    checks: list[DrillCheck]


class DrillRecord(TypedDict, total=False):
    """What a drill records in the backup's manifest (`verification`) and returns."""

    backup: Required[str]
    job: Required[str]
    mode: Required[str]  # scratch-restore | content-check | pitr-scratch-recovery
    point_in_time: str  # a PITR drill: the instant recovered, and from which base
    base: str
    destination: str
    swept_scratch: list[str]
    databases: int  # a set: how many of its databases were compared
    duration_s: float
    rto_s: float
    scratch: str | None
    not_restored: str
    counts: str
    counts_compared: int
    tables_compared: int
    rows_restored: int
    mismatches: dict[str, Mismatch] | None
    checks: list[DrillCheck] | None
    outcome: str  # passed | failed | not_run


class Verification(ProcedureBase):
    async def verify(self, job: Job, target: TargetConfig, engine: Engine,
                     progress: Progress, supplied: Sequence[AgeKey] = (), *,
                     keep_plan: bool = False) -> DrillRecord:
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
        if not keep_plan:  # (a PITR drill's plan has its recovery before this)
            progress.plan = {Phase.VERIFYING: (0, 20), Phase.RESTORING: (20, 90),
                             Phase.CHECKING: (90, 100)}
        t0 = time.monotonic()
        drill = engine.drill if isinstance(engine, Drillable) else None
        record: DrillRecord = {"backup": name.filename, "job": job.id,
                               "mode": "content-check" if drill is None
                               else "scratch-restore"}
        try:  # any failure (a damaged copy, a failed restore) is recorded as a failed drill
            plan = await self._verify(target, engine, name, copies, progress, ids)
            record["destination"] = plan.store.name
            return await self._drill(job, target, engine, name, plan.store,
                                     plan.load_manifest(), drill, record, ids, progress, t0,
                                     plan.windows)
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
                     name: naming.BackupName, store: BackupStore, manifest: Mapping[str, object],
                     drill: Drill | None, record: DrillRecord, ids: Sequence[AgeKey],
                     progress: Progress, t0: float,
                     windows: bytes | None = None) -> DrillRecord:
        mismatches: dict[str, Mismatch] = {}
        checks: list[DrillCheck] = []
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
            progress.set_phase(Phase.RESTORING, bytes_total=count_in(manifest, "raw_bytes"))
            async with self._plain(store, target, name, manifest, ids, windows) as checked:
                parts = whole(checked) if token is None else backup_sets.members(checked,
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
                    for c in found["checks"]:
                        checks.append({**c, "database": database} if database else c)
                    compared += 1
                if token is not None:
                    record["databases"] = compared
                    # a set's check is about one of its databases: passed where it ran true
                    by_sql: dict[str, list[DrillCheck]] = {}
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
                         chunks: AsyncIterator[bytes], manifest: Mapping[str, object],
                         record: DrillRecord, progress: Progress, t0: float
                         ) -> DrillFound:
        """One database into a scratch copy: restored, counted, checked, dropped."""
        kind = str(manifest.get("count_kind", ""))
        exact = manifest.get("exact_counts")
        malformed = exact is not None and _counts(exact) is None
        expected = _counts(exact) or (
            _counts(manifest.get("counts")) if kind in ("rows", "keys", "documents") else None)
        # estimates (MySQL's information_schema) cannot be compared: the tables can
        names_only = expected is None and kind.endswith("_estimate")
        if names_only:  # only the names are compared
            listed = manifest.get("counts")
            expected = {str(t): 0 for t in listed} if isinstance(listed, dict) and listed \
                else None
        mismatches: dict[str, Mismatch] = {}
        if malformed:
            # counts were recorded, but not as counts: nothing can prove this backup
            mismatches["(manifest exact_counts)"] = {"expected": "a count per table",
                                                     "restored": None}
        checks: list[DrillCheck] = []
        async with drill.scratch(target) as scratch:
            loaded = drill.restore_filter(chunks)
            if drill.skipped:
                record["not_restored"] = drill.skipped
            await engine.restore(scratch, loaded, progress, clean=True, manifest=manifest,
                                 options=RestoreOptions(scratch=True))
            record["rto_s"] = round(time.monotonic() - t0, 3)
            record["scratch"] = drill.last_scratch
            progress.set_phase(Phase.CHECKING)
            got = await drill.exact_counts(scratch)
            if expected is None:
                record["counts"] = ("the manifest's exact_counts are not counts: compared "
                                    "nothing" if mismatches else
                                    "not recorded at dump time: compared nothing")
            elif names_only:
                present = {unquoted(t) for t in got}
                mismatches = {t: {"expected": "present", "restored": None}
                              for t in expected if unquoted(t) not in present}
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

    async def _verify(self, target: TargetConfig, engine: Engine, name: naming.BackupName,
                      copies: list[tuple[BackupStore, ManifestDoc]], progress: Progress,
                      identities: Sequence[AgeKey]) -> RestorePlan:
        """Find the first copy whose stored bytes match its manifest's sha256 (a copy that
        is missing or damaged is passed over, and said so). An engine that cannot load
        inside one transaction also gets the whole content checked here (inflation bound,
        only what its restore may run) before anything is touched: same checks as
        uploads. An encrypted backup is decrypted far enough to prove the identity."""
        progress.set_phase(Phase.VERIFYING, bytes_total=copies[0][1].get("size_bytes"))
        problems: list[str] = []
        last: BaseException | None = None
        for store, manifest in copies:
            try:
                plan = await self._verify_copy(target, engine, name, store, manifest,
                                               progress, identities)
            except (IntegrityError, NotFound, Unavailable) as exc:
                why, last = exc.message, exc
            except SafeholdError:
                raise  # the content was refused: the same bytes are everywhere
            except Exception as exc:  # the destination failed mid-read (network, disk)
                why, last = f"{type(exc).__name__}: {exc}", exc
            else:
                return plan
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
                           manifest: ManifestDoc, progress: Progress,
                           identities: Sequence[AgeKey]) -> RestorePlan:
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
                # what the load will write (beside the live database: elsewhere)
                formats.check_scope(engine.name, target.url or "", {**facts, "databases": cast(
                    list[str], [written(d) for d in facts.get("databases") or []])})
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
            found = facts.get("databases")
            return RestorePlan(store, manifest,
                               databases=None if found is None else tuple(str(d) for d in found),
                               windows=windows.finish(),
                               set_members=tuple(facts.get("set_members") or ()))
        digest = await self._digest(store, target, name, progress.add_bytes,
                                    chain if any(s["codec"] == "age" for s in chain) else None,
                                    identities)
        if digest != expected:
            raise self._mismatch(name)
        return RestorePlan(store, manifest)

    @staticmethod
    def _check_set(target: TargetConfig, engine: Engine, manifest: Mapping[str, object],
                   in_file: list[str | None]) -> None:
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


def _counts(value: object) -> dict[str, int] | None:
    """A manifest's exact counts per table (read back, so checked): None unless every
    entry is a name and a count."""
    if not isinstance(value, dict):
        return None
    out: dict[str, int] = {}
    for name, n in value.items():
        if not isinstance(name, str) or not isinstance(n, int) or isinstance(n, bool):
            return None
        out[name] = n
    return out
