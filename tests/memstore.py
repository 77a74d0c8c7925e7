"""An in-memory BackupStore: the contract of shared.storage.base kept in a dict, for tests
of what sits above a store (catalog, retention, listings) that need no disk and no bucket.
tests/support/store_contract.py holds it to the same contract as the local and S3 stores."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from shared import manifests, naming
from shared.config import DestinationConfig
from shared.errors import NotFound, PipelineError

CHUNK = 1 << 20


class MemoryPending:
    def __init__(self, store: MemoryStore, target: str, name: naming.BackupName,
                 temp: str) -> None:
        self.store, self.target, self.name, self.temp = store, target, name, temp
        self.handle = f"{store.name}:{target}/{temp}/{name.filename}"
        self.final = False

    async def write(self, data: bytes) -> None:
        if self.store.fail_writes:
            raise OSError(28, "No space left on device (a test's full destination)")
        self.store.temps[self.temp][1].extend(data)
        self.store.temps[self.temp] = (time.monotonic(), self.store.temps[self.temp][1])

    async def complete(self, size: int, sha256: str) -> dict[str, Any]:
        data = bytes(self.store.temps.pop(self.temp)[1])
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise PipelineError(f"read-back check failed on {self.store.name}",
                                code="readback_mismatch")
        key = (self.target, self.name.filename)
        if key in self.store.data:
            raise PipelineError(f"a backup named {self.name.filename} appeared meanwhile; "
                                "not overwritten", code="name_taken")
        self.store.data[key] = data
        self.final = True
        return {"size_bytes": size, "check": "sha256"}

    async def write_manifest(self, manifest: dict[str, Any]) -> None:
        assert self.final
        self.store.manifests[(self.target, self.name.filename)] = json.dumps(
            {"format_version": 1, **manifest})

    async def abort(self) -> None:
        self.store.temps.pop(self.temp, None)
        key = (self.target, self.name.filename)
        if self.final and key not in self.store.manifests:
            self.store.data.pop(key, None)


class MemoryStore:
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.config = DestinationConfig(name, "local", f"<memory {name}>")
        self.data: dict[tuple[str, str], bytes] = {}
        self.manifests: dict[tuple[str, str], str] = {}  # as stored: text, hostile on read
        self.temps: dict[str, tuple[float, bytearray]] = {}
        self.fail_writes = False  # a test's full destination: every write raises ENOSPC

    def objects_of(self, target: str) -> list[str]:
        """Every object held for `target`, complete or not (what a crash could leave)."""
        return sorted([f for t, f in self.data if t == target] + list(self.temps))

    def _key(self, target: str, filename: str) -> tuple[str, str]:
        return target, naming.parse_in(target, filename).filename

    async def list_manifests(self, target: str) -> list[dict[str, Any]]:
        out = []
        for (t, filename), text in list(self.manifests.items()):
            if t != target or (t, filename) not in self.data:
                continue
            out.append(self._vetted(filename, text))
        return out

    def _vetted(self, filename: str, text: str) -> dict[str, Any]:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            return manifests.damaged(naming.parse_stored(filename), str(exc))
        return manifests.vet(doc, filename)

    async def read_manifest(self, target: str, filename: str) -> dict[str, Any]:
        key = self._key(target, filename)
        if key not in self.manifests or key not in self.data:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found")
        return self._vetted(key[1], self.manifests[key])

    async def size(self, target: str, filename: str) -> int:
        key = self._key(target, filename)
        if key not in self.data:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found")
        return len(self.data[key])

    async def open(self, target: str, filename: str, start: int = 0,
                   end: int | None = None) -> AsyncIterator[bytes]:
        key = self._key(target, filename)
        if key not in self.data:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found")
        blob = self.data[key][start: None if end is None else end + 1]
        for i in range(0, len(blob), CHUNK):
            await asyncio.sleep(0)
            yield blob[i:i + CHUNK]

    async def exists(self, target: str, filename: str) -> bool:
        key = self._key(target, filename)
        return key in self.data or key in self.manifests

    async def begin(self, target: str, name: naming.BackupName, tag: str) -> MemoryPending:
        self._key(target, name.filename)  # the name fits where it goes
        temp = f".safehold-{tag}-{secrets.token_hex(4)}.partial"
        self.temps[temp] = (time.monotonic(), bytearray())
        return MemoryPending(self, target, name, temp)

    async def delete(self, target: str, filename: str) -> None:
        key = self._key(target, filename)
        if key not in self.manifests:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found")
        del self.manifests[key]
        self.data.pop(key, None)

    async def remove_temp(self, handle: str) -> None:
        _, _, rest = handle.partition(":")
        target, _, rest = rest.partition("/")
        temp, _, final = rest.partition("/")
        self.temps.pop(temp, None)
        if final and (target, final) not in self.manifests:
            self.data.pop((target, final), None)

    async def sweep_temps(self, keep: set[str], min_age: float = 300.0) -> list[str]:
        now = time.monotonic()
        kept = {h.split("/")[1] for h in keep if h.count("/") >= 1}
        gone = [t for t, (touched, _) in self.temps.items()
                if t not in kept and now - touched >= min_age]
        for t in gone:
            del self.temps[t]
        return gone

    async def health(self) -> dict[str, Any]:
        return {"reachable": True, "writable": True, "backups": len(self.manifests),
                "bytes": sum(len(d) for d in self.data.values())}

    async def presigned_url(self, target: str, filename: str, ttl: int) -> str | None:
        return None

    async def annotate(self, target: str, filename: str, fields: dict[str, Any]) -> None:
        key = self._key(target, filename)
        self.manifests[key] = json.dumps({**json.loads(self.manifests[key]), **fields})

    async def close(self) -> None:
        return None
