"""The `BackupStore` contract every destination implements (local disk, S3), and
`open_store`, which makes one from its config.

Nothing outside the store implementations sees where a backup's bytes are (a path, a
bucket key): callers name backups by target and file name, read them as byte streams, and
write them through a `PendingBackup`. A job records its pending backups' opaque *handles*
so that a reaper can remove what a dead worker left.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Literal, Protocol, Required, TypeAlias, TypedDict

from shared import naming
from shared.config import DestinationConfig
from shared.errors import ErrorDoc

if TYPE_CHECKING:  # manifests import this module's Outcome
    from shared.manifests import ManifestDoc


class Readback(TypedDict, total=False):
    """What `complete` proved the destination holds."""

    size_bytes: Required[int]
    check: Required[str]  # sha256 (read back whole) or etag (S3's own per-part digests)
    etag: str
    parts: int


class StoredOutcome(Readback):
    """A destination that stored the backup, with what its read-back proved."""

    status: Required[Literal["stored"]]


class FailedOutcome(TypedDict):
    """A destination that could not store the backup, and why."""

    status: Literal["failed"]
    error: ErrorDoc


# one destination's part in a backup, as its manifest records it
Outcome: TypeAlias = StoredOutcome | FailedOutcome


class Health(TypedDict, total=False):
    """A destination's answer to `health()` (the catalog adds its config and targets)."""

    reachable: Required[bool]
    writable: bool | None
    free_bytes: int | None
    backups: int
    bytes: int
    unfinished_uploads: int
    error: str


class PendingBackup(Protocol):
    """A backup being written to one destination under a name chosen in advance.

    `write` receives the stored (encoded) bytes in order. `complete(size, sha256)` makes
    them durable under the final name and reads back what the destination holds (size and
    a checksum as stored), raising PipelineError, with nothing left behind, if it differs.
    The backup is not listed until `write_manifest` — always the last write. `abort`
    removes whatever was written, at any point before the manifest (idempotent)."""

    handle: str  # opaque; `BackupStore.remove_temp(handle)` cleans up after a crash

    async def write(self, data: bytes) -> None: ...
    async def complete(self, size: int, sha256: str) -> Readback: ...
    async def write_manifest(self, manifest: Mapping[str, object]) -> None: ...
    async def abort(self) -> None: ...


class BackupStore(Protocol):
    """One destination. All methods are async and safe to call concurrently.

    * `list_manifests(target)`: manifests of complete backups (manifest *and* data present).
    * `read_manifest(target, filename)` / `size(...)`: NotFound(`backup_not_found`) when
      either the manifest or the data is missing.
    * `open(target, filename, start, end)`: the stored bytes [start, end] (inclusive) as an
      async iterator of chunks of at most ~1 MiB.
    * `exists(target, filename)`: anything (data, manifest or a reservation) under the name.
    * `begin(target, name, tag)`: a PendingBackup writing `name` (never overwriting).
    * `delete(target, filename)`: the manifest first (the backup leaves listings), then
      the data. NotFound when there is no manifest.
    * `remove_temp(handle)` / `sweep_temps(keep, min_age)`: crash leftovers (temp files,
      unfinished multipart uploads) of pending backups not in `keep`.
    * `health()`: reachable / writable / free space / objects, for `GET /destinations`.
    * `presigned_url(...)`: a short-lived download URL, or None when the store has none.
    * `annotate(target, filename, fields)`: merge facts learnt later (a drill's outcome)
      into the manifest; the data is never touched.
    """

    name: str
    config: DestinationConfig

    async def list_manifests(self, target: str) -> list[ManifestDoc]: ...
    async def read_manifest(self, target: str, filename: str) -> ManifestDoc: ...
    async def size(self, target: str, filename: str) -> int: ...
    def open(self, target: str, filename: str, start: int = 0,
             end: int | None = None) -> AsyncGenerator[bytes, None]: ...
    async def exists(self, target: str, filename: str) -> bool: ...
    async def begin(self, target: str, name: naming.BackupName, tag: str) -> PendingBackup: ...
    async def delete(self, target: str, filename: str) -> None: ...
    async def remove_temp(self, handle: str) -> None: ...
    async def sweep_temps(self, keep: set[str], min_age: float) -> list[str]: ...
    async def health(self) -> Health: ...
    async def presigned_url(self, target: str, filename: str, ttl: int) -> str | None: ...
    async def annotate(self, target: str, filename: str, fields: Mapping[str, object]
                       ) -> None: ...
    async def close(self) -> None: ...


def open_store(config: DestinationConfig) -> BackupStore:
    if config.type == "s3":
        from shared.storage.s3 import S3Storage

        return S3Storage(config)
    from shared.storage.local import LocalStorage

    return LocalStorage(config.path, name=config.name, config=config,
                        file_mode=int(config.file_mode, 8))
