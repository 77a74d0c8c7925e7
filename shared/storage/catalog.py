"""The `Catalog` of a target's destinations: it fans one backup out to all of them at once
(`Fanout`), lists and finds backups again across them, and bridges async streams to
blocking readers (`BlockingStream`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

from shared import manifests, naming
from shared.config import Settings, TargetConfig
from shared.errors import NotFound, PipelineError, SafeholdError, Unavailable, disk_full
from shared.manifests import ManifestDoc
from shared.storage.base import (
    BackupStore,
    Outcome,
    PendingBackup,
    Readback,
    StoredOutcome,
    open_store,
)

log = logging.getLogger("safehold.storage")
QUEUE_DEPTH = 2  # stored chunks (~1 MiB) waiting per destination


# ---------------------------------------------------------------------------- fan-out
class Fanout:
    """One stored stream written to several destinations at once.

    Each destination drains its own small queue in its own task, so they all write at the
    same time; `write` waits while any live queue is full (the slowest sets the pace, memory
    stays at QUEUE_DEPTH chunks per destination). A destination that fails is dropped and
    recorded; the others go on."""

    def __init__(self, pendings: dict[str, PendingBackup]) -> None:
        self.pendings = pendings
        self.errors: dict[str, SafeholdError] = {}
        self._queues: dict[str, asyncio.Queue[bytes | None]] = {
            n: asyncio.Queue(QUEUE_DEPTH) for n in pendings}
        self._tasks = {n: asyncio.create_task(self._drain(n)) for n in pendings}

    @property
    def handles(self) -> list[str]:
        return [p.handle for p in self.pendings.values()]

    def live(self) -> list[str]:
        return [n for n in self.pendings if n not in self.errors]

    async def _drain(self, name: str) -> None:
        queue, pending = self._queues[name], self.pendings[name]
        try:
            while (chunk := await queue.get()) is not None:
                await pending.write(chunk)
        except Exception as exc:
            self.errors[name] = _as_error(exc, name)
            log.warning("destination %s failed while writing: %s", name, exc)
            while not queue.empty():  # let a writer blocked on this queue go on
                queue.get_nowait()
            await _quietly(pending.abort())

    async def write(self, data: bytes) -> None:
        live = self.live()
        if not live:
            raise self._none_left()
        for name in live:
            queue = self._queues[name]
            while name not in self.errors:
                try:
                    await asyncio.wait_for(queue.put(data), 1.0)
                    break
                except TimeoutError:
                    if self._tasks[name].done():
                        break

    async def finish(self, size: int, sha256: str) -> dict[str, Outcome]:
        """End every stream, complete and read back each; return each destination's
        outcome ({"status": "stored" | "failed", …}). Raises if none stored it."""
        for name in self.live():
            await self._queues[name].put(None)
        await asyncio.gather(*self._tasks.values())

        async def complete(name: str) -> None:
            try:
                self.readback[name] = await self.pendings[name].complete(size, sha256)
            except Exception as exc:
                self.errors[name] = _as_error(exc, name)
                log.warning("destination %s failed to complete: %s", name, exc)
                await _quietly(self.pendings[name].abort())

        self.readback: dict[str, Readback] = {}
        await asyncio.gather(*(complete(n) for n in self.live()))
        outcomes: dict[str, Outcome] = {}
        for n in self.live():
            outcomes[n] = StoredOutcome(status="stored", **self.readback[n])
        for n, err in self.errors.items():
            outcomes[n] = {"status": "failed", "error": err.to_dict()}
        if not self.live():
            await self.abort()
            raise self._none_left()
        return outcomes

    async def publish(self, manifest: manifests.Manifest) -> None:
        """Write the manifest (last) on every destination that stored the data; one
        failing here loses that copy (aborted), the others stand."""
        doc = manifest.document()

        async def one(name: str) -> None:
            try:
                await self.pendings[name].write_manifest(doc)
            except Exception as exc:
                self.errors[name] = _as_error(exc, name)
                await _quietly(self.pendings[name].abort())

        await asyncio.gather(*(one(n) for n in self.live()))
        if not self.live():
            raise self._none_left()

    async def abort(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(_quietly(p.abort()) for p in self.pendings.values()))

    def _none_left(self) -> PipelineError:
        detail = "; ".join(f"{n}: {e.message}" for n, e in self.errors.items())
        err = PipelineError(f"the backup could not be stored on any destination ({detail})",
                            code="storage_failed")
        if len(self.errors) == 1:
            only = next(iter(self.errors.values()))
            err = PipelineError(only.message, code=only.code)
            err.status = only.status
        return err


def _as_error(exc: BaseException, name: str) -> SafeholdError:
    if isinstance(exc, SafeholdError):
        return exc
    if disk_full(exc):
        return PipelineError(f"destination {name}: no space left on the device",
                             code="storage_full")
    return PipelineError(f"destination {name}: {type(exc).__name__}: {exc}",
                         code="storage_failed")


async def _quietly(aw: Awaitable[object]) -> None:
    try:
        await aw
    except Exception as exc:  # cleanup of a failure: report the first error, not this one
        log.warning("cleanup failed: %s", exc)


# ---------------------------------------------------------------------------- catalog
class Catalog:
    """A target's backups across its destinations: merged listings, lookups in read order,
    fan-out writes, deletion everywhere. Stores are opened lazily (S3 clients need a loop)."""

    def __init__(self, settings: Settings,
                 stores: dict[str, BackupStore] | None = None) -> None:
        """`stores`: destinations already open, by name (a test's in-memory double)."""
        self.settings = settings
        self.configs = settings.destination_configs()
        self._stores: dict[str, BackupStore] = dict(stores or {})
        order = settings.storage.read_order
        self._read_first = [n.strip() for n in order.split(",") if n.strip()]

    def store(self, name: str) -> BackupStore:
        if name not in self._stores:
            self._stores[name] = open_store(self.configs[name])
        return self._stores[name]

    def stores_of(self, target: TargetConfig | str) -> list[BackupStore]:
        """The target's destinations in read order (storage.read_order first)."""
        if isinstance(target, str) and target.endswith(naming.PITR_SUFFIX):
            target = target[: -len(naming.PITR_SUFFIX)]  # a target's archive: its stores
        t = self.settings.target(target) if isinstance(target, str) else target
        names = [n for n in self._read_first if n in t.destinations]
        names += [n for n in t.destinations if n not in names]
        return [self.store(n) for n in names]

    async def list_backups(self, target: str) -> list[ManifestDoc]:
        """`listing(target)`'s backups (raises when no destination answers)."""
        return (await self.listing(target))[0]

    async def listing(self, target: str) -> tuple[list[ManifestDoc], list[str]]:
        """Complete backups on any destination, newest first (by the time in their names),
        each once, with `stored_on` (where a usable copy is now) in read order, and the
        destinations that could not be listed. A backup whose every copy has a damaged
        manifest is listed as damaged (`damaged_on`); a good copy elsewhere wins.
        Unavailable(`storage_unavailable`) when no destination answers: an unreachable
        bucket is not an empty one."""
        stores = self.stores_of(target)
        listed = await asyncio.gather(*(s.list_manifests(target) for s in stores),
                                      return_exceptions=True)
        good: dict[str, ManifestDoc] = {}
        bad: dict[str, ManifestDoc] = {}
        unavailable: dict[str, str] = {}
        for store, result in zip(stores, listed, strict=True):
            if isinstance(result, BaseException):
                log.warning("destination %s could not be listed: %s", store.name, result)
                unavailable[store.name] = f"{type(result).__name__}: {result}"
                continue
            for m in result:
                key = str(m["filename"])
                pile = bad if m.get("damaged") else good
                entry = pile.setdefault(key, {**m, "stored_on": [], "damaged_on": []})
                (entry["damaged_on"] if m.get("damaged") else entry["stored_on"]).append(
                    store.name)
        if stores and len(unavailable) == len(stores):
            raise Unavailable(
                f"no destination of target '{target}' answers, so its backups cannot be "
                "listed: " + "; ".join(f"{n}: {why}"[:300] for n, why in unavailable.items()),
                code="storage_unavailable")
        for key, entry in bad.items():
            if key in good:
                good[key]["damaged_on"] += entry["damaged_on"]
            else:
                good[key] = {**entry, "stored_on": []}
        out = list(good.values())
        for entry in out:
            if not entry["damaged_on"]:
                del entry["damaged_on"]

        def newest(m: ManifestDoc) -> tuple[datetime, int]:
            name = naming.parse_stored(str(m["filename"]))
            return name.created_at, name.seq

        out.sort(key=newest, reverse=True)
        return out, list(unavailable)

    async def copies(self, target: str, name: naming.BackupName, *,
                     include_damaged: bool = False
                     ) -> list[tuple[BackupStore, ManifestDoc]]:
        """Every complete copy of a backup, in read order; NotFound when there is none.
        Copies whose manifest is damaged are left out (DamagedManifest when no other copy
        is left) unless `include_damaged` (to delete them)."""
        found = []
        errors = []
        for store in self.stores_of(target):
            try:
                found.append((store, await store.read_manifest(target, name.filename)))
            except NotFound:
                continue
            except Exception as exc:
                errors.append(f"{store.name}: {exc}")
                log.warning("destination %s unreadable: %s", store.name, exc)
        if not found:
            msg = f"no backup '{name.filename}' for target '{target}'"
            if errors:  # not "it does not exist": we could not look everywhere
                raise Unavailable(f"{msg} on any reachable destination; unreachable: "
                                  f"{'; '.join(errors)}", code="storage_unavailable")
            raise NotFound(msg, code="backup_not_found")
        if not include_damaged:
            usable = [(s, m) for s, m in found if not m.get("damaged")]
            if not usable:
                manifests.usable(found[0][1])  # raises, saying why
            found = usable
        where = [s.name for s, _ in found]
        return [(s, {**m, "stored_on": where}) for s, m in found]

    async def manifest(self, target: str, name: naming.BackupName) -> ManifestDoc:
        return (await self.copies(target, name))[0][1]

    async def annotate(self, target: str, name: naming.BackupName,
                       fields: dict[str, object]) -> None:
        """Merge `fields` into the manifest of every copy (best effort per destination)."""
        for store, _ in await self.copies(target, name):
            try:
                await store.annotate(target, name.filename, fields)
            except Exception as exc:
                log.warning("destination %s: could not annotate %s: %s", store.name,
                            name.filename, exc)

    async def delete(self, target: str, name: naming.BackupName) -> list[str]:
        """Delete every copy; returns where it was deleted."""
        copies = await self.copies(target, name, include_damaged=True)
        for store, _ in copies:
            await store.delete(target, name.filename)
        return [s.name for s, _ in copies]

    async def reserve(self, target: TargetConfig, name: naming.BackupName,
                      claim: Callable[[str], Awaitable[bool]] | None = None
                      ) -> naming.BackupName:
        """The first `name` (seq bumped) free on every destination of the target and
        claimed by this writer (`claim`: a Redis SET NX shared by every API and worker, so
        two uploads in one second never pick one name). A destination that cannot answer is
        left to fail when the backup begins there (its writes never overwrite anyway)."""
        stores = self.stores_of(target)
        for seq in range(name.seq, 10000):
            candidate = name.with_seq(seq)
            taken = await asyncio.gather(*(s.exists(target.id, candidate.filename)
                                           for s in stores), return_exceptions=True)
            if any(t is True for t in taken):
                continue
            if claim is None or await claim(candidate.filename):
                return candidate
        raise PipelineError("could not find a free backup name")  # pragma: no cover

    async def begin(self, target: TargetConfig, name: naming.BackupName, tag: str,
                    on_handles: Callable[[list[str]], Awaitable[None]] | None = None
                    ) -> Fanout:
        """Start writing `name` to every destination of the target. A destination that
        cannot even start is recorded as failed; the others go on."""
        pendings: dict[str, PendingBackup] = {}
        failed: dict[str, SafeholdError] = {}
        try:
            for store in self.stores_of(target):
                try:
                    pendings[store.name] = await store.begin(target.id, name, tag)
                except Exception as exc:
                    failed[store.name] = _as_error(exc, store.name)
                    log.warning("destination %s cannot take a backup: %s", store.name, exc)
        except BaseException:  # cancelled midway: take back what was started
            await asyncio.shield(asyncio.gather(*(_quietly(p.abort())
                                                  for p in pendings.values())))
            raise
        fan = Fanout(pendings)
        fan.errors.update(failed)
        if on_handles is not None:
            try:
                await on_handles(fan.handles)
            except BaseException:
                await asyncio.shield(fan.abort())
                raise
        if not fan.live():
            await fan.abort()
            raise fan._none_left()
        return fan

    def spool_path(self, target: str, tag: str) -> Path:
        """A fresh local spool file for bytes not yet a backup (an upload being checked);
        under the local root, so a crash leftover is swept like any temp file. Blocking."""
        from shared.storage.local import TEMP_PREFIX

        if "/" in target or target.startswith("."):
            raise NotFound(f"unknown target '{target}'", code="target_not_found")
        from shared.storage.local import make_private_dir

        d = Path(self.settings.storage.path) / target
        make_private_dir(d)
        return d / f"{TEMP_PREFIX}{tag}-{secrets.token_hex(4)}.partial"

    async def remove_temp(self, handle: str) -> None:
        dest, _, _rest = handle.partition(":")
        if dest in self.configs:
            await self.store(dest).remove_temp(handle)

    async def sweep_temps(self, keep: set[str], min_age: float = 300.0) -> list[str]:
        removed: list[str] = []
        for name in self.configs:
            try:
                removed += await self.store(name).sweep_temps(keep, min_age)
            except Exception as exc:
                log.warning("destination %s: sweeping temps failed: %s", name, exc)
        return removed

    async def health(self) -> list[dict[str, object]]:
        async def one(name: str) -> dict[str, object]:
            store = self.store(name)
            try:
                h = await store.health()
            except Exception as exc:
                h = {"reachable": False, "error": f"{type(exc).__name__}: {exc}"}
            used_by = [t.id for t in self.settings.targets.values() if name in t.destinations]
            return {**store.config.public(), "targets": used_by, **h}

        return list(await asyncio.gather(*(one(n) for n in self.configs)))

    async def close(self) -> None:
        for store in self._stores.values():
            await _quietly(store.close())
        self._stores.clear()


# ---------------------------------------------------------------------------- bridges
class BlockingStream:
    """A blocking `read(n)` over an async byte iterator, for code running in a thread (the
    decoding loop, validators) while the iterator runs on the event loop."""

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._chunks = chunks
        self._loop = loop
        self._buf = b""
        self._eof = False
        self._stopped = False

    def stop(self) -> None:
        """Later reads fail (any thread): a reader that should stop stops."""
        self._stopped = True

    def read(self, n: int = -1) -> bytes:
        if self._stopped:
            raise PipelineError("reading the backup was stopped")
        while not self._buf and not self._eof:
            fut = asyncio.run_coroutine_threadsafe(_next(self._chunks), self._loop)
            try:
                chunk = fut.result()
            except concurrent.futures.CancelledError:
                raise PipelineError("reading the backup was cancelled") from None
            if chunk is None:
                self._eof = True
            else:
                self._buf = chunk
        n = len(self._buf) if n is None or n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        self._stopped = True
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(aclose(), self._loop).result(30)


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None
