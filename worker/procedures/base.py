"""What the procedures share: the services they use and the checks of a stored copy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from shared import codecs, naming
from shared.codecs import plain_limit
from shared.codecs.base import AgeKey
from shared.config import Settings, TargetConfig
from shared.errors import (
    IntegrityError,
    PipelineError,
    RestoreFailed,
)
from shared.jobs import Job, JobStatus, JobStore
from shared.outage import JobTakenOver
from shared.storage.base import BackupStore
from shared.storage.catalog import BlockingStream, Catalog
from worker import pipeline
from worker.engines import RowCounter

log = logging.getLogger("safehold.worker")


async def counted(chunks: AsyncIterator[bytes], counter: RowCounter
                  ) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        counter.feed(chunk)
        yield chunk


def unquoted(name: str) -> str:
    """A table name without identifier quoting (dump-time estimates are unquoted)."""
    return name.replace('"', "").replace("`", "")


# keys a worker once set, in memory, on the manifest a load is given (its control data now
# travels in RestorePlan and RestoreOptions): one found in a stored manifest (anyone able
# to write a .json beside a backup) is still dropped, never passed on
_IN_MEMORY_ONLY = ("also_clean", "plain_windows")


@dataclass(frozen=True)
class RestorePlan:
    """A copy of a backup that proved itself, and what the worker learnt reading it: the
    worker's own data, kept apart from the stored manifest (untrusted, read-only here).

    `databases`: the databases the check found in the file (they override what the
    manifest claims); `windows`: digests of the plain bytes the check read, which the load
    must see again (`pipeline.SameAsChecked`), when the engine's check read it whole;
    `set_members`: a backup set's members as checked."""

    store: BackupStore
    stored: Mapping[str, object]
    databases: tuple[str, ...] | None = None
    windows: bytes | None = None
    set_members: tuple[Mapping[str, object], ...] = ()

    def load_manifest(self) -> dict[str, object]:
        """What an engine's load goes by: the stored manifest without any key only a worker
        may set, with what the check found in the file over it."""
        out = {k: v for k, v in self.stored.items() if k not in _IN_MEMORY_ONLY}
        if self.databases is not None:
            out["databases"] = list(self.databases)
        return out

    def databases_in_file(self) -> list[str | None]:
        return [d if isinstance(d := m.get("database"), str) else None
                for m in self.set_members]


async def whole(chunks: AsyncIterator[bytes]
                 ) -> AsyncIterator[tuple[str | None, AsyncIterator[bytes]]]:
    """A one-database backup, shaped like a set's members."""
    yield None, chunks


# a drill stopped by these proved nothing about the backup: `not_run`, never `failed`


DRILL_NOT_RUN = frozenset({"identity_required", "wrong_identity", "drill_unavailable"})


class ProcedureBase:
    """What every procedure shares: the services, the job still being this worker's, the
    identities that open a target's backups, the checks of a stored copy."""

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
    def identities(self, target: TargetConfig) -> list[AgeKey]:
        """The worker's age identities for `target` (encryption.identity_file), if any."""
        enc = target.encryption
        if enc is None or not enc.identity_file:
            return []
        return codecs.identities_from_file(enc.identity_file)

    def _limit(self, manifest: Mapping[str, object]) -> int:
        limits = self.settings.limits
        declared, stored = manifest.get("raw_bytes"), manifest.get("size_bytes")
        return plain_limit(stored if isinstance(stored, int) else 0,
                           max_bytes=limits.max_restore_bytes, ratio=limits.max_expansion_ratio,
                           declared=int(declared) if isinstance(declared, int) else None)

    async def _digest(self, store: BackupStore, target: TargetConfig, name: naming.BackupName,
                      on_bytes: Callable[[int], None] | None = None,
                      probe_chain: Sequence[codecs.Step] | None = None,
                      identities: Sequence[AgeKey] = ()) -> str:
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

    @contextlib.asynccontextmanager
    async def _plain(self, store: BackupStore, target: TargetConfig, name: naming.BackupName,
                     manifest: Mapping[str, object], identities: Sequence[AgeKey],
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
            await chunks.aclose()
