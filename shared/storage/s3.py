"""S3-compatible backup storage (a `BackupStore`): AWS S3, SeaweedFS, MinIO, Ceph, R2, B2…

Layout: `<prefix>/<target>/<file>` and its manifest `<prefix>/<target>/<file>.json`. A backup
is one streamed multipart upload straight to its final key (never visible until completed);
the manifest object is written last, so an incomplete backup is never listed. Names never
overwrite: the name is checked free under the target lock, and completion and the manifest
are conditional puts (`If-None-Match: *`) where the server honours them.

Multipart parts grow with the stream (`part_size`): 8 MiB for the first thousand parts, then
doubling every thousand, so 1 TB fits in ~6,900 of the 10,000 parts allowed. Parts above
16 MiB are spooled to a local temp file, not memory; at most `max_concurrency` parts upload
at once. Any failure aborts the upload; a dead worker's upload is aborted by the reaper from
the handle its job recorded (`<dest>:<key>?<upload id>`), and `sweep_temps` aborts what is
left after a day. The read-back check compares the object's size and its multipart ETag
(the MD5 of the parts' MD5s, computed here as the parts go) with what was sent.

Client: aiobotocore (measured against obstore in `bench/s3_clients.py`; chosen because it
exposes upload ids, abort, listing of multipart uploads, Object Lock and SSE parameters).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, BinaryIO

from shared import manifests, naming
from shared.config import DestinationConfig
from shared.errors import InvalidBackupName, NotFound, PipelineError
from shared.manifests import ManifestDoc
from shared.storage.base import Health, Readback

if TYPE_CHECKING:  # the client's types (a dev dependency: types-aiobotocore-s3)
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        MultipartUploadTypeDef,
        ObjectTypeDef,
    )

log = logging.getLogger("safehold.s3")
MiB = 1 << 20
FIRST_PART = 8 * MiB
PARTS_PER_STEP = 1000
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
SPOOL_ABOVE = 16 * MiB
CHUNK = MiB
SWEEP_MIN_AGE = 86400.0  # unfinished uploads not owned by a running job: aborted after a day


def part_size(number: int) -> int:
    """Size of multipart part `number` (1-based): 8 MiB, doubling every 1000 parts."""
    return min(FIRST_PART << ((number - 1) // PARTS_PER_STEP), MAX_PART)


def capacity(parts: int = MAX_PARTS) -> int:
    """Bytes that `parts` parts of the schedule hold."""
    return sum(part_size(n) for n in range(1, parts + 1))


def _code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def _missing(exc: BaseException) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound", "NoSuchUpload")


def _unsupported(exc: BaseException) -> bool:
    """The server does not know conditional writes (older MinIO, Ceph, B2…)."""
    return _code(exc) in ("NotImplemented", "501")


def _precondition(exc: BaseException) -> bool:
    return _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict")


class _Part:
    """One part being filled: memory up to SPOOL_ABOVE, a temp file beyond."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.size = part_size(number)
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.length = 0
        self._mem: list[bytes] = []
        self._file: BinaryIO | None = None

    def add(self, data: bytes) -> None:
        self.md5.update(data)
        self.length += len(data)
        if self._file is None and self.size > SPOOL_ABOVE:
            self._file = tempfile.TemporaryFile(prefix="safehold-part-")  # noqa: SIM115
        if self._file is not None:
            self._file.write(data)
        else:
            self._mem.append(data)

    def body(self) -> bytes | BinaryIO:
        if self._file is not None:
            self._file.seek(0)
            return self._file
        out, self._mem = b"".join(self._mem), []  # never both copies at once
        return out

    def close(self) -> None:
        self._mem = []
        if self._file is not None:
            self._file.close()


class S3Pending:
    def __init__(self, store: S3Storage, target: str, name: naming.BackupName, key: str,
                 upload_id: str) -> None:
        self.store, self.target, self.name = store, target, name
        self.key, self.upload_id = key, upload_id
        self.handle = f"{store.name}:{key}?{upload_id}"
        self._part = _Part(1)
        self._done: list[CompletedPartTypeDef] = []
        self._md5s: list[bytes] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._completed = False

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._part.size - self._part.length
            # MD5 and a spool file's write run off the event loop
            await asyncio.to_thread(self._part.add, bytes(view[:room]))
            view = view[room:]
            if self._part.length >= self._part.size:
                await self._send(self._part)
                self._part = _Part(self._part.number + 1)

    async def _send(self, part: _Part) -> None:
        if part.number > MAX_PARTS:
            raise PipelineError("the backup exceeds the S3 multipart limit (10,000 parts)")
        while len(self._inflight) >= self.store.config.max_concurrency:
            done, self._inflight = await asyncio.wait(self._inflight,
                                                      return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        self._md5s.append(part.md5.digest())
        self._inflight.add(asyncio.create_task(self._upload(part)))

    async def _upload(self, part: _Part) -> None:
        try:
            s3 = await self.store.client()
            r = await s3.upload_part(Bucket=self.store.bucket, Key=self.key,
                                     PartNumber=part.number, UploadId=self.upload_id,
                                     Body=part.body(), ContentLength=part.length,
                                     **self.store.md5_param(part.md5.digest()))
            self._done.append({"PartNumber": part.number, "ETag": r["ETag"]})
        finally:
            part.close()

    async def complete(self, size: int, sha256: str) -> Readback:
        if self._part.length or not self._done and not self._inflight:
            await self._send(self._part)
        if self._inflight:
            await asyncio.gather(*self._inflight)
            self._inflight = set()
        s3 = await self.store.client()
        parts = sorted(self._done, key=lambda p: p["PartNumber"])
        kwargs: dict[str, Any] = {}
        if self.store.conditional:
            kwargs["IfNoneMatch"] = "*"
        try:
            try:
                await s3.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts}, **kwargs)
            except Exception as exc:
                if not (kwargs and _unsupported(exc)):
                    raise
                self.store.conditional = False  # the name is still claimed under Redis
                await s3.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts})
        except Exception as exc:
            if _precondition(exc):
                raise PipelineError(f"a backup named {self.name.filename} appeared meanwhile "
                                    f"on {self.store.name}; not overwritten",
                                    code="name_taken") from None
            raise
        self._completed = True
        head = await s3.head_object(Bucket=self.store.bucket, Key=self.key)
        stored = int(head["ContentLength"])
        expected_etag = (hashlib.md5(b"".join(self._md5s), usedforsecurity=False).hexdigest()
                         + f"-{len(self._md5s)}")
        etag = str(head.get("ETag", "")).strip('"')
        check = "size+etag"
        if "kms" in str(head.get("ServerSideEncryption", "")) or \
                self.store.config.sse == "aws:kms":
            check = "size"  # SSE-KMS ETags are not MD5-based (also a bucket's default)
        problem = None
        if stored != size:
            problem = f"stored {stored} bytes, sent {size}"
        elif check == "size+etag" and etag != expected_etag:
            problem = f"ETag {etag} differs from the parts sent ({expected_etag})"
        if problem:
            await self.abort()
            raise PipelineError(f"read-back check failed on {self.store.name}: {problem}",
                                code="readback_mismatch")
        return {"size_bytes": stored, "check": check, "etag": etag, "parts": len(parts)}

    async def write_manifest(self, manifest: Mapping[str, object]) -> None:
        body = json.dumps({"format_version": 1, **manifest}, indent=2,
                          sort_keys=True).encode()
        await self.store.put_small(f"{self.key}.json", body, "application/json")

    async def abort(self) -> None:
        for t in self._inflight:
            t.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        self._part.close()
        if not self._completed:
            # a completion the server made while we were cancelled: the upload is gone, the
            # object is there without a manifest, and it is removed. An upload still open
            # (our completion refused: name_taken) leaves the key alone: the object there
            # is another writer's
            if await self.store.abort_upload(self.key, self.upload_id):
                await self.store.remove_orphan(self.key)
        else:
            s3 = await self.store.client()
            await s3.delete_object(Bucket=self.store.bucket, Key=self.key)


class S3Storage:
    def __init__(self, config: DestinationConfig) -> None:
        self.config = config
        self.name = config.name
        self.bucket = config.bucket
        self.prefix = config.prefix.strip("/")
        self.conditional = True  # cleared when the server refuses If-None-Match
        self._client: S3Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self._manifest_cache: dict[str, tuple[str, ManifestDoc]] = {}

    async def client(self) -> S3Client:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from aiobotocore.config import AioConfig
                    from aiobotocore.session import get_session

                    c = self.config
                    cfg = AioConfig(
                        # HTTPS: the payload is not hashed again for the signature (TLS and
                        # the ETag check cover it); plain HTTP is always signed in full
                        s3={"addressing_style": "path" if c.path_style else "virtual",
                            "payload_signing_enabled": False},
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=5, read_timeout=120, signature_version="s3v4",
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        max_pool_connections=max(10, c.max_concurrency * 2))
                    assert c.access_key is not None and c.secret_key is not None
                    stack = contextlib.AsyncExitStack()
                    self._client = await stack.enter_async_context(get_session().create_client(
                        "s3", endpoint_url=c.endpoint or None, region_name=c.region,
                        aws_access_key_id=c.access_key.reveal(),
                        aws_secret_access_key=c.secret_key.reveal(), config=cfg))
                    self._stack = stack
        return self._client

    def key(self, target: str, filename: str) -> str:
        if "/" in target or target.startswith("."):
            raise NotFound(f"unknown target '{target}'", code="target_not_found")
        name = naming.parse_in(target, filename).filename
        return f"{self.prefix}/{target}/{name}" if self.prefix else f"{target}/{name}"

    def md5_param(self, digest: bytes) -> dict[str, Any]:
        """ContentMD5 (botocore keyword arguments), which S3 requires with Object Lock."""
        if not self.config.object_lock_mode:
            return {}
        return {"ContentMD5": base64.b64encode(digest).decode()}

    def _object_params(self) -> dict[str, Any]:
        """What every object written gets (botocore keyword arguments): encryption,
        storage class, Object Lock."""
        c = self.config
        out: dict[str, Any] = {}
        if c.sse:
            out["ServerSideEncryption"] = c.sse
            if c.sse == "aws:kms" and c.sse_kms_key_id:
                out["SSEKMSKeyId"] = c.sse_kms_key_id
        if c.storage_class:
            out["StorageClass"] = c.storage_class
        if c.object_lock_mode:
            out["ObjectLockMode"] = c.object_lock_mode
            out["ObjectLockRetainUntilDate"] = (datetime.now(UTC)
                                                + timedelta(days=c.object_lock_days))
        return out

    async def put_small(self, key: str, body: bytes, content_type: str) -> None:
        s3 = await self.client()
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket, "Key": key, "Body": body, "ContentType": content_type,
            **self._object_params(), **self.md5_param(_md5(body))}
        try:
            try:
                if self.conditional:
                    await s3.put_object(**kwargs, IfNoneMatch="*")
                else:
                    await s3.put_object(**kwargs)
            except Exception as exc:
                if not (self.conditional and _unsupported(exc)):
                    raise
                self.conditional = False
                await s3.put_object(**kwargs)
        except Exception as exc:
            if _precondition(exc):
                raise PipelineError(f"{key} already exists on {self.name}; not overwritten",
                                    code="name_taken") from None
            raise

    # ------------------------------------------------------------------ reading
    async def _list_keys(self, prefix: str) -> dict[str, ObjectTypeDef]:
        s3 = await self.client()
        out: dict[str, ObjectTypeDef] = {}
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []) or []:
                out[obj["Key"]] = obj
        return out

    async def list_manifests(self, target: str) -> list[ManifestDoc]:
        if "/" in target or target.startswith("."):
            raise NotFound(f"unknown target '{target}'", code="target_not_found")
        base = f"{self.prefix}/{target}/" if self.prefix else f"{target}/"
        keys = await self._list_keys(base)
        wanted = []
        for key, obj in keys.items():
            if not key.endswith(".json"):
                continue
            data_key = key[: -len(".json")]
            try:
                naming.parse_in(target, data_key.rsplit("/", 1)[-1])
            except InvalidBackupName:
                continue
            if data_key in keys:
                wanted.append((key, str(obj.get("ETag", ""))))

        async def one(key: str, etag: str) -> ManifestDoc | None:
            filename = key[: -len(".json")].rsplit("/", 1)[-1]
            cached = self._manifest_cache.get(key)
            if cached and cached[0] == etag:
                return cached[1]
            try:
                doc = manifests.vet(await self._get_json(key), filename)
            except NotFound:
                return None  # deleted meanwhile
            except ValueError as exc:
                doc = manifests.damaged(naming.parse_in(target, filename), str(exc))
            self._manifest_cache[key] = (etag, doc)
            return doc

        docs = await asyncio.gather(*(one(k, e) for k, e in wanted))
        return [d for d in docs if d is not None]

    async def _get_json(self, key: str) -> dict[str, object]:
        s3 = await self.client()
        try:
            r = await s3.get_object(Bucket=self.bucket, Key=key)
            if int(r.get("ContentLength") or 0) > manifests.MAX_MANIFEST_BYTES:
                r["Body"].close()
                raise ValueError("the manifest is larger than any manifest Safehold writes")
            async with r["Body"] as body:
                raw = b""  # read() may answer with what has arrived: read to the end
                while len(raw) <= manifests.MAX_MANIFEST_BYTES:
                    part = await body.read(manifests.MAX_MANIFEST_BYTES + 1 - len(raw))
                    if not part:
                        break
                    raw += part
        except ValueError:
            raise
        except Exception as exc:
            if _missing(exc):
                raise NotFound(f"{key} not found", code="backup_not_found") from None
            raise
        if len(raw) > manifests.MAX_MANIFEST_BYTES:
            raise ValueError("the manifest is larger than any manifest Safehold writes")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested past Python's depth
            raise ValueError("the manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ValueError("the manifest is not a JSON object")
        return doc

    async def read_manifest(self, target: str, filename: str) -> ManifestDoc:
        key = self.key(target, filename)
        try:
            doc = manifests.vet(await self._get_json(f"{key}.json"), filename)
        except NotFound:
            raise NotFound(f"no backup '{filename}' for target '{target}'",
                           code="backup_not_found") from None
        except ValueError as exc:
            doc = manifests.damaged(naming.parse_in(target, filename), str(exc))
        await self.size(target, filename)
        return doc

    async def size(self, target: str, filename: str) -> int:
        s3 = await self.client()
        try:
            head = await s3.head_object(Bucket=self.bucket, Key=self.key(target, filename))
        except Exception as exc:
            if _missing(exc):
                raise NotFound(f"backup '{filename}' has no data object on {self.name}",
                               code="backup_not_found") from None
            raise
        return int(head["ContentLength"])

    async def open(self, target: str, filename: str, start: int = 0,
                   end: int | None = None) -> AsyncGenerator[bytes, None]:
        s3 = await self.client()
        kwargs: dict[str, Any] = {}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            r = await s3.get_object(Bucket=self.bucket, Key=self.key(target, filename),
                                    **kwargs)
        except Exception as exc:
            if _missing(exc):
                raise NotFound(f"no backup '{filename}' for target '{target}'",
                               code="backup_not_found") from None
            raise
        async with r["Body"] as body:
            while block := await body.read(CHUNK):
                yield block

    async def exists(self, target: str, filename: str) -> bool:
        key = self.key(target, filename)
        keys = await self._list_keys(key)
        return key in keys or f"{key}.json" in keys

    async def annotate(self, target: str, filename: str, fields: Mapping[str, object]) -> None:
        key = f"{self.key(target, filename)}.json"
        doc = {**await self._get_json(key), **fields}
        s3 = await self.client()
        body = json.dumps(doc, indent=2, sort_keys=True).encode()
        await s3.put_object(Bucket=self.bucket, Key=key, Body=body,  # a new version
                            ContentType="application/json", **self._object_params(),
                            **self.md5_param(_md5(body)))
        self._manifest_cache.pop(key, None)

    async def presigned_url(self, target: str, filename: str, ttl: int) -> str | None:
        s3 = await self.client()
        url: str = await s3.generate_presigned_url(
            "get_object", ExpiresIn=ttl,
            Params={"Bucket": self.bucket, "Key": self.key(target, filename),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"'})
        return url

    # ------------------------------------------------------------------ writing
    async def begin(self, target: str, name: naming.BackupName, tag: str) -> S3Pending:
        s3 = await self.client()
        key = self.key(target, name.filename)
        up = await s3.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType="application/octet-stream",
            Metadata={"safehold-tag": tag[:100]}, **self._object_params())
        return S3Pending(self, target, name, key, up["UploadId"])

    async def delete(self, target: str, filename: str) -> None:
        s3 = await self.client()
        key = self.key(target, filename)
        try:
            await s3.head_object(Bucket=self.bucket, Key=f"{key}.json")
        except Exception as exc:
            if _missing(exc):
                raise NotFound(f"no backup '{filename}' for target '{target}'",
                               code="backup_not_found") from None
            raise
        await s3.delete_object(Bucket=self.bucket, Key=f"{key}.json")
        self._manifest_cache.pop(f"{key}.json", None)
        await s3.delete_object(Bucket=self.bucket, Key=key)

    # ------------------------------------------------------------------ leftovers
    def _ours(self, key: str) -> bool:
        """`<prefix>/<target>/<backup name>` — nothing else in the bucket is touched."""
        rest = key[len(self.prefix) + 1:] if self.prefix else key
        if self.prefix and not key.startswith(self.prefix + "/"):
            return False
        target, _, filename = rest.partition("/")
        try:
            naming.parse_in(target, filename)
        except InvalidBackupName:
            return False
        return bool(target) and "/" not in filename

    async def remove_temp(self, handle: str) -> None:
        """A dead job's upload (the reaper's call): aborted, and its object removed if it
        completed but never got a manifest. The orphan is looked for even when the abort
        "succeeded": some servers (SeaweedFS) accept aborting an upload that already
        completed (found by tests/test_store_contract.py)."""
        _, _, rest = handle.partition(":")
        key, _, upload_id = rest.partition("?")
        if not key or not upload_id or not self._ours(key):
            return
        await self.abort_upload(key, upload_id)
        await self.remove_orphan(key)

    async def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort a multipart upload; True when the server no longer knew it (completed
        or aborted already)."""
        s3 = await self.client()
        try:
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            if not _missing(exc):
                raise
            return True
        return False

    async def remove_orphan(self, key: str) -> None:
        """Delete the object at `key` if it has no manifest (data nothing lists)."""
        keys = await self._list_keys(key)
        if key in keys and f"{key}.json" not in keys:
            s3 = await self.client()
            await s3.delete_object(Bucket=self.bucket, Key=key)

    async def _uploads(self) -> list[MultipartUploadTypeDef]:
        s3 = await self.client()
        out: list[MultipartUploadTypeDef] = []
        paginator = s3.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket,
                                             Prefix=f"{self.prefix}/" if self.prefix else ""):
            out += page.get("Uploads", []) or []
        return out

    async def sweep_temps(self, keep: set[str], min_age: float = 300.0) -> list[str]:
        removed = []
        now = time.time()
        for up in await self._uploads():
            if not self._ours(up["Key"]):
                continue  # another application's upload in the same bucket
            handle = f"{self.name}:{up['Key']}?{up['UploadId']}"
            initiated = up.get("Initiated")
            age = now - initiated.timestamp() if initiated else float("inf")
            if handle in keep or age < max(min_age, SWEEP_MIN_AGE):
                continue
            await self.remove_temp(handle)
            removed.append(handle)
        return removed

    async def health(self) -> Health:
        s3 = await self.client()
        await s3.head_bucket(Bucket=self.bucket)
        probe = f"{self.prefix}/.safehold-probe-{secrets.token_hex(4)}".lstrip("/")
        try:
            await s3.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            await s3.delete_object(Bucket=self.bucket, Key=probe)
            writable = True
        except Exception:
            writable = False
        keys = await self._list_keys(f"{self.prefix}/" if self.prefix else "")
        manifests = [k for k in keys if k.endswith(".json")]
        data = sum(int(o.get("Size", 0)) for k, o in keys.items() if not k.endswith(".json"))
        return {"reachable": True, "writable": writable, "free_bytes": None,
                "backups": len(manifests), "bytes": data,
                "unfinished_uploads": len(await self._uploads())}

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._client = None
        self._stack = None


def _md5(body: bytes) -> bytes:
    return hashlib.md5(body, usedforsecurity=False).digest()
