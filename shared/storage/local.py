"""Local backup storage (a `BackupStore`): `<root>/<target>/<file>` plus a `<file>.json`
manifest sidecar.

Write order (a crash at any point leaves no half backup listed):
1. bytes go to `<target>/.tmp-<tag>-<rand>.partial`, fsynced;
2. the temp file is hard-linked to its final name (`link` never overwrites), the temp name
   unlinked, the dir fsynced, and the file read back (size, sha256);
3. the manifest is written to a temp name, fsynced and renamed to `<file>.json`.
Listing reads manifests only; a data file without a manifest, or a temp file, is never
listed. Blocking work runs in threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import BinaryIO

from shared import manifests, naming
from shared.config import DestinationConfig
from shared.errors import InvalidBackupName, NotFound, PipelineError
from shared.manifests import ManifestDoc
from shared.storage.base import Health, Readback

MANIFEST_VERSION = 1
TEMP_PREFIX = ".tmp-"
CHUNK = 1 << 20


def _read_json(path: Path) -> object:
    """A manifest's JSON, bounded (ValueError when it is not JSON or too large)."""
    with path.open("rb") as f:
        raw = f.read(manifests.MAX_MANIFEST_BYTES + 1)
    if len(raw) > manifests.MAX_MANIFEST_BYTES:
        raise ValueError("the manifest is larger than any manifest Safehold writes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's depth
        raise ValueError("the manifest is not valid JSON") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(d: Path) -> None:
    """Create `d` (and missing parents) readable by the service user only (0700)."""
    for parent in reversed([d, *d.parents]):
        if not parent.exists():
            try:
                parent.mkdir(mode=0o700)
            except FileExistsError:
                pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class LocalPending:
    """A backup being written to a local temp file (see the module docstring)."""

    def __init__(self, store: LocalStorage, target: str, name: naming.BackupName,
                 path: Path, handle: BinaryIO) -> None:
        self.store, self.target, self.name = store, target, name
        self.temp, self._f = path, handle
        self.final: Path | None = None
        # the final name too: a worker that dies between link and manifest leaves data the
        # reaper must find
        self.handle = f"{store.name}:{target}/{path.name}/{name.filename}"
        self._completing: asyncio.Future[Readback] | None = None

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._f.write, data)

    async def complete(self, size: int, sha256: str) -> Readback:
        self._completing = asyncio.ensure_future(
            asyncio.to_thread(self._complete, size, sha256))
        return await self._completing

    def _complete(self, size: int, sha256: str) -> Readback:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        # read back before the file gets its name: what the disk holds is what was sent
        stored = self.temp.stat().st_size
        digest = sha256_file(self.temp)
        if stored != size or digest != sha256:
            self.temp.unlink(missing_ok=True)
            raise PipelineError(f"read-back check failed on {self.store.name}: stored "
                                f"{stored} bytes (sha256 {digest[:12]}…), expected {size} "
                                f"(sha256 {sha256[:12]}…)", code="readback_mismatch")
        final = self.temp.with_name(self.name.filename)
        try:
            os.link(self.temp, final)
        except FileExistsError:
            self.temp.unlink(missing_ok=True)
            raise PipelineError(f"a backup named {self.name.filename} appeared meanwhile; "
                                "not overwritten", code="name_taken") from None
        self.final = final
        self.temp.unlink()
        _fsync_dir(final.parent)
        return {"size_bytes": stored, "check": "sha256"}

    async def write_manifest(self, manifest: Mapping[str, object]) -> None:
        assert self.final is not None
        await asyncio.to_thread(self.store._write_json,
                                self.final.with_name(f"{self.name.filename}.json"), manifest)

    async def abort(self) -> None:
        if self._completing is not None and not self._completing.done():
            await asyncio.wait({self._completing})  # never race the linking thread

        def _abort() -> None:
            if not self._f.closed:
                self._f.close()
            self.temp.unlink(missing_ok=True)
            if self.final is not None:
                self.final.unlink(missing_ok=True)
        await asyncio.to_thread(_abort)


class LocalStorage:
    def __init__(self, root: str | os.PathLike[str], *, name: str = "local",
                 config: DestinationConfig | None = None, file_mode: int = 0o600) -> None:
        self.root = Path(root)
        self.name = name
        self.config = config or DestinationConfig(name, "local", str(root))
        self.file_mode = file_mode  # backups and manifests; directories are 0700

    def _dir(self, target: str) -> Path:
        if "/" in target or target.startswith("."):
            raise NotFound(f"unknown target '{target}'", code="target_not_found")
        return self.root / target

    def _file(self, target: str, filename: str) -> Path:
        return self._dir(target) / naming.parse_in(target, filename).filename

    # ------------------------------------------------------------------ reading
    async def list_manifests(self, target: str) -> list[ManifestDoc]:
        return await asyncio.to_thread(self._list, target)

    def _list(self, target: str) -> list[ManifestDoc]:
        d = self._dir(target)
        if not d.is_dir():
            return []
        out = []
        for entry in d.iterdir():
            if not entry.name.endswith(".json") or entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                name = naming.parse_in(target, entry.name[: -len(".json")])
            except InvalidBackupName:
                continue
            if not (d / name.filename).exists():
                continue
            try:
                out.append(manifests.vet(_read_json(entry), name.filename))
            except OSError:
                continue  # gone meanwhile (deleted by a prune)
            except ValueError as exc:
                out.append(manifests.damaged(name, str(exc)))
        return out

    async def read_manifest(self, target: str, filename: str) -> ManifestDoc:
        return await asyncio.to_thread(self._manifest, target, filename)

    def _manifest(self, target: str, filename: str) -> ManifestDoc:
        data = self._file(target, filename)
        try:
            doc = _read_json(data.with_name(f"{data.name}.json"))
        except FileNotFoundError:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found") from None
        except ValueError as exc:
            doc = exc
        if not data.exists():
            raise NotFound(f"backup '{filename}' has a manifest but no data file",
                           code="backup_not_found")
        if isinstance(doc, ValueError):
            return manifests.damaged(naming.parse_in(target, data.name), str(doc))
        return manifests.vet(doc, data.name)

    async def size(self, target: str, filename: str) -> int:
        try:
            return (await asyncio.to_thread(self._file(target, filename).stat)).st_size
        except FileNotFoundError:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found") from None

    async def open(self, target: str, filename: str, start: int = 0,
                   end: int | None = None) -> AsyncGenerator[bytes, None]:
        path = self._file(target, filename)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found") from None
        try:
            await asyncio.to_thread(f.seek, start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                block = await asyncio.to_thread(f.read, CHUNK if left is None
                                                else min(CHUNK, left))
                if not block:
                    break
                if left is not None:
                    left -= len(block)
                yield block
        finally:
            await asyncio.to_thread(f.close)

    async def exists(self, target: str, filename: str) -> bool:
        p = self._file(target, filename)
        return await asyncio.to_thread(
            lambda: p.exists() or p.with_name(f"{p.name}.json").exists())

    async def presigned_url(self, target: str, filename: str, ttl: int) -> str | None:
        return None

    async def annotate(self, target: str, filename: str, fields: Mapping[str, object]
                       ) -> None:
        def _annotate() -> None:
            data = self._file(target, filename)
            man = data.with_name(f"{data.name}.json")
            doc = json.loads(man.read_text())
            self._write_json(man, {**doc, **fields})
        await asyncio.to_thread(_annotate)

    # ------------------------------------------------------------------ writing
    async def begin(self, target: str, name: naming.BackupName, tag: str) -> LocalPending:
        def _begin() -> LocalPending:
            d = self._file(target, name.filename).parent  # the name fits where it goes
            make_private_dir(d)
            path = d / f"{TEMP_PREFIX}{tag}-{secrets.token_hex(4)}.partial"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
            return LocalPending(self, target, name, path, os.fdopen(fd, "wb"))
        return await asyncio.to_thread(_begin)

    def _write_json(self, path: Path, doc: Mapping[str, object]) -> None:
        tmp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}.json.partial")
        doc = {"format_version": MANIFEST_VERSION, **doc}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    async def delete(self, target: str, filename: str) -> None:
        def _delete() -> None:
            data = self._file(target, filename)
            man = data.with_name(f"{data.name}.json")
            if not man.exists():
                raise NotFound(f"no backup '{filename}' for target '{target}'",
                               code="backup_not_found")
            man.unlink()
            data.unlink(missing_ok=True)
            _fsync_dir(data.parent)
        await asyncio.to_thread(_delete)

    # ------------------------------------------------------------------ leftovers
    async def remove_temp(self, handle: str) -> None:
        """Remove a dead job's temp file, and its final file if it got no manifest."""
        _, _, rest = handle.partition(":")
        target, _, rest = rest.partition("/")
        temp, _, final = rest.partition("/")
        if not temp.startswith(TEMP_PREFIX) or "/" in temp or not temp.endswith(".partial"):
            return
        d = self._dir(target)
        await asyncio.to_thread((d / temp).unlink, missing_ok=True)
        if final:
            data = self._file(target, final)
            if not await asyncio.to_thread(data.with_name(f"{data.name}.json").exists):
                await asyncio.to_thread(data.unlink, missing_ok=True)

    def temp_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for d in self.root.iterdir() if d.is_dir()
                for p in d.glob(f"{TEMP_PREFIX}*.partial")]

    async def sweep_temps(self, keep: set[str], min_age: float = 300.0) -> list[str]:
        """Delete crash leftovers: temp files of jobs not in `keep`, untouched for `min_age`
        seconds (an upload in progress has no job but keeps its file fresh)."""
        def _sweep() -> list[str]:
            removed = []
            now = time.time()
            for p in self.temp_files():
                tag = p.name[len(TEMP_PREFIX):].rsplit("-", 1)[0]
                if tag in keep:
                    continue
                try:
                    if now - p.stat().st_mtime < min_age:
                        continue
                except FileNotFoundError:
                    continue
                p.unlink(missing_ok=True)
                removed.append(f"{self.name}:{p.parent.name}/{p.name}")
            return removed
        return await asyncio.to_thread(_sweep)

    async def health(self) -> Health:
        def _health() -> Health:
            make_private_dir(self.root)
            probe = self.root / f"{TEMP_PREFIX}probe-{secrets.token_hex(4)}.partial"
            try:
                probe.write_bytes(b"ok")
                probe.unlink()
                writable = True
            except OSError:
                writable = False
            usage = shutil.disk_usage(self.root)
            count = size = 0
            for d in self.root.iterdir():
                if d.is_dir() and not d.name.startswith("."):
                    for m in self._list(d.name):
                        count += 1
                        size += int(m.get("size_bytes") or 0)
            return {"reachable": True, "writable": writable, "free_bytes": usage.free,
                    "backups": count, "bytes": size}
        return await asyncio.to_thread(_health)

    async def close(self) -> None:
        return None
