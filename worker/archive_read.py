"""Reading a target's PITR archive back for a recovery: which base and WAL an instant
needs (`choose`), and their bytes from the first sound copy, every object's stored and
plain sha256 checked (`ArchiveReader`). Used by restores and drills to a point in time
(worker/procedures/pitr.py) and by `safehold pitr restore-cluster`
(worker/cluster_restore.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared import codecs, naming
from shared.codecs.base import AgeKey
from shared.errors import IntegrityError, PipelineError, RestoreFailed
from shared.jobs import now_iso
from shared.manifests import ManifestDoc
from shared.pitr_window import ArchivedBase, ArchivedPiece, current, runs
from shared.storage.base import BackupStore
from shared.storage.catalog import Catalog
from worker import pipeline
from worker.engines import pg_pitr


def when_of(value: str) -> datetime | None:
    """A point in time as submitted ("latest": None)."""
    if value == "latest":
        return None
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if at.tzinfo is None:
        raise ValueError("a point in time needs its zone (…Z or +hh:mm)")
    return at.astimezone(UTC)


@dataclass(frozen=True)
class Recovery:
    """What recovering to an instant takes: the newest base consistent by then and the
    archived WAL from its start on (one timeline, continuous)."""

    base: ArchivedBase
    wal: list[ArchivedPiece]
    at: datetime | None  # None: the archive's end ("latest")


def choose(listing: Iterable[Mapping[str, object]], asked: str, target: str) -> Recovery:
    """The recovery of `asked` (an instant, "latest", or "random": anywhere in the
    window) from an archive's listing; outside_window (nothing changed) when the window
    does not hold it."""
    now_archived = current(listing)
    held = now_archived.pieces
    found = runs(held)
    last = found[-1] if found else None
    if last is None or last.covers_until is None:
        raise RestoreFailed(f"target '{target}' has no archived WAL yet",
                            database_unchanged=True, code="outside_window")
    covered = [b for b in now_archived.bases if b.timeline == last.timeline
               and last.start <= b.start and b.end <= last.end
               and b.consistent_at <= last.covers_until]
    if asked == "random" and covered:
        first = min(b.consistent_at for b in covered)
        at: datetime | None = first + (last.covers_until - first) * random.random()
    else:
        at = when_of(asked) if asked != "random" else None
    stop = at if at is not None else last.covers_until
    usable = [b for b in covered if b.consistent_at <= stop]
    if not usable or stop > last.covers_until:
        earliest = min((b.consistent_at for b in covered), default=None)
        raise RestoreFailed(
            f"{asked} is outside the recovery window of '{target}' (from "
            f"{earliest.isoformat() if earliest else 'no base yet'} to "
            f"{last.covers_until.isoformat()}); nothing was changed",
            database_unchanged=True, code="outside_window")
    base = max(usable, key=lambda b: b.consistent_at)
    return Recovery(base, [p for p in held if p.timeline == last.timeline
                           and p.end > base.start and p.start < last.end], at)


class ArchiveReader:
    """An archive's objects, read back as hostile input until their checksums agree."""

    def __init__(self, catalog: Catalog, archive: str, identities: Sequence[AgeKey]) -> None:
        self.catalog = catalog
        self.archive = archive
        self.identities = identities

    async def read(self, filename: str,
                   consume: Callable[[AsyncIterator[bytes]], Awaitable[None]],
                   reset: Callable[[], Awaitable[None]] | None = None) -> None:
        """Give `consume` an archive object's plain bytes from its first sound copy: the
        stored sha256 is checked as it streams (a codec usually breaks before the digest is
        reached) and the plain sha256 at the end. A copy found damaged is marked so
        (`read_failed`: listed as damaged from then on, so the window shows the hole until
        it is archived again) and the next destination's copy is read after `reset`; with
        none left the recovery stops before changing anything (archive_damaged)."""
        name = naming.parse_archive(filename)
        problems: list[str] = []
        for store, manifest in await self.catalog.copies(self.archive, name):
            plain = hashlib.sha256()
            try:
                await consume(self._plain(store, manifest, filename, plain))
                recorded = manifest.get("plain_sha256")
                if isinstance(recorded, str) and recorded != plain.hexdigest():
                    raise IntegrityError("its content is not what was archived")
                return
            except (PipelineError, IntegrityError) as exc:
                if exc.code in ("wrong_identity", "identity_required"):
                    raise RestoreFailed(exc.message, database_unchanged=True,
                                        code=exc.code) from None
                problems.append(f"{store.name}: {exc.message}")
                with contextlib.suppress(Exception):
                    await store.annotate(self.archive, filename, {"read_failed": {
                        "at": now_iso(), "why": exc.message[:300]}})
                if reset is not None:
                    await reset()
        raise RestoreFailed(f"the archive object {filename} is damaged on every destination "
                            f"({'; '.join(problems)[:600]}); the restore stopped before "
                            "changing anything", database_unchanged=True,
                            code="archive_damaged")

    async def _plain(self, store: BackupStore, manifest: ManifestDoc, filename: str,
                     plain: hashlib._Hash) -> AsyncIterator[bytes]:
        async def stored() -> AsyncIterator[bytes]:
            async for chunk in store.open(self.archive, filename):
                yield chunk
        async for chunk in pipeline.stored_plain(
                stored(), codecs.chain_of(manifest),
                expect_sha256=str(manifest.get("sha256")), identities=self.identities):
            plain.update(chunk)
            yield chunk

    async def unpack_base(self, base: ArchivedBase, data: Path) -> None:
        """The base's tar into the data directory `data` (emptied again before another
        copy is tried)."""
        async def unpack(chunks: AsyncIterator[bytes]) -> None:
            await pg_pitr.untar(chunks, data)

        async def emptied() -> None:
            await asyncio.to_thread(_empty, data)
        await self.read(base.filename, unpack, emptied)

    async def stage(self, wal: list[ArchivedPiece], staged: Path) -> list[Path]:
        """Each WAL segment under its own name, as restore_command fetches it: a whole
        segment as archived, or its parts written at their offsets (the rest zeros, where
        recovery ends)."""
        out: dict[str, Path] = {}
        for p in wal:
            path = staged / p.segment
            if p.segment not in out:
                await asyncio.to_thread(pg_pitr.zero_file, path, p.seg_bytes)
                out[p.segment] = path
            offset = p.start - pg_pitr.segment_start(p.segment, p.seg_bytes)

            async def write(chunks: AsyncIterator[bytes], path: Path = path,
                            offset: int = offset) -> None:
                with open(path, "r+b") as f:  # noqa: ASYNC230 - local disk, small writes
                    f.seek(offset)
                    async for chunk in chunks:
                        await asyncio.to_thread(f.write, chunk)
            await self.read(p.filename, write)
        return list(out.values())


def _empty(directory: Path) -> None:
    """Everything inside `directory` removed (it stays, with its mode)."""
    import shutil

    if not directory.exists():
        return
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
