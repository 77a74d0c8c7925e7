"""Storing an upload: spooled locally, size-capped, hashed, validated, then stored on every
destination of the target and listed as `upload_…`. On any failure nothing is left behind.
`Operations.upload` is the one way in (role check and audit); the surfaces only say how the
bytes arrive (`receive`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiofiles

from api.context import Services
from api.files import UploadSink
from shared import codecs, formats, manifests, naming, stats
from shared.codecs import plain_limit
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import BadRequest, PipelineError
from shared.formats.common import FileFacts
from shared.jobs import Requester
from shared.manifests import ManifestDoc
from shared.storage.catalog import Fanout

_UNSAFE = re.compile(r"[^\w.\- ()+]")
CHUNK = 1 << 20


def _client_name(name: str | None) -> str | None:
    """The client's file name, for the manifest only (never used as a path)."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("_", base)[:200] or None


def _chain(path: Path, head: bytes, target: TargetConfig
           ) -> tuple[list[codecs.Step], list[AgeKey], str | None]:
    """The codec chain of an uploaded file from its bytes (never its name), the identities
    that open it, and a note when it is encrypted to a key this server does not hold.
    Blocking."""
    outer = codecs.sniff(head)
    if outer != "age":
        return ([{"codec": outer}] if outer else []), [], None
    ids: list[AgeKey] = []
    enc = target.encryption
    if enc is not None and enc.identity_file:
        with contextlib.suppress(PipelineError, BadRequest):
            ids = codecs.identities_from_file(enc.identity_file)
    opaque: list[codecs.Step] = [{"codec": "auto"}, {"codec": "age"}]
    if not ids:
        return opaque, [], ("age-encrypted and no identity is configured on this server "
                            "(encryption.identity_file): accepted unverified; it is checked "
                            "when it is restored")
    with open(path, "rb") as f:
        reader = codecs.PlainReader(f, [{"codec": "age"}], identities=ids)
        try:
            first = reader.next_chunk() or b""
        except PipelineError as exc:
            if exc.code != "wrong_identity":
                raise
            return opaque, [], ("age-encrypted to a key this server does not hold: accepted "
                                "unverified; it is checked when it is restored")
        finally:
            reader.close()
    inner = codecs.sniff(first)
    sealed: list[codecs.Step] = [{"codec": inner}] if inner else []
    return [*sealed, {"codec": "age"}], ids, None


def _validate(engine: str, path: Path, chain: list[codecs.Step], limit: int,
              identities: list[AgeKey]) -> FileFacts:
    with open(path, "rb") as f:
        return formats.validate(engine, f, chain, limit=limit, identities=identities)


async def _store_spool(spool: Path, fan: Fanout, seal: codecs.AgeEncrypt | None
                       ) -> tuple[str, int]:
    """Stream the checked spool to the destinations (through age when `seal`); returns the
    stored bytes' sha256 and size."""
    digest, size = hashlib.sha256(), 0

    async def emit(data: bytes) -> None:
        nonlocal size
        if data:
            digest.update(data)
            size += len(data)
            await fan.write(data)

    async with aiofiles.open(spool, "rb") as f:
        while block := await f.read(CHUNK):
            await emit(await asyncio.to_thread(seal.feed, block) if seal else block)
    if seal is not None:
        await emit(await asyncio.to_thread(seal.flush))
    return digest.hexdigest(), size


Receive = Callable[[UploadSink], Awaitable[str | None]]  # fills the sink; the client's name


async def store_upload(s: Services, target: TargetConfig, receive: Receive,
                       requested_by: Requester) -> ManifestDoc:
    """Receive (`receive`), validate and store an upload on the target's destinations."""
    spool = await asyncio.to_thread(s.catalog.spool_path, target.id, "upload")
    started = datetime.now(UTC)
    fan = None
    seal: codecs.AgeEncrypt | None = None
    try:
        async with UploadSink(spool, s.settings.server.max_upload_bytes) as sink:
            client_name = await receive(sink)
        if sink.size == 0:
            raise BadRequest("the upload is empty", code="invalid_upload")
        limits = s.settings.limits
        limit = plain_limit(sink.size, max_bytes=limits.max_restore_bytes,
                            ratio=limits.max_expansion_ratio)
        loop = asyncio.get_running_loop()
        chain, ids, note = await loop.run_in_executor(
            s.validation_pool, _chain, spool, sink.head, target)
        info: FileFacts | None = None
        if note is None:
            found: FileFacts = await loop.run_in_executor(
                s.validation_pool, functools.partial(_validate, target.engine, spool, chain,
                                                     limit, ids))
            formats.check_scope(target.engine, target.url or "", found)
            info = found
        # a target whose backups are encrypted gets its uploads encrypted too
        seal = None
        if target.encryption is not None and (not chain or chain[-1]["codec"] != "age"):
            keys = target.encryption.recipient_lines()
            seal = codecs.AgeEncrypt(keys)
            chain = [*chain, {"codec": "age", "recipients": [
                codecs.recipient_fingerprint(k) for k in keys]}]
        name = await s.catalog.reserve(target, naming.new_name(
            "upload", target.engine, started,
            codecs=[c["codec"] for c in chain if c["codec"] != "auto"]),
            claim=s.store.name_claimer(target.id, spool.name))
        fan = await s.catalog.begin(target, name, "upload")
        sha256, size = await _store_spool(spool, fan, seal)
        outcomes = await fan.finish(size, sha256)
        manifest = manifests.Manifest(
            name=name, target=target.id, created_at=started, finished_at=datetime.now(UTC),
            size_bytes=size, sha256=sha256, raw_bytes=info["raw_bytes"] if info else None,
            chain=chain, destinations=outcomes,
            requested_by=requested_by, note=note,
            facts={"server_version": None, **{k: v for k, v in (info or {}).items()
                                                if k != "raw_bytes"}}, upload=manifests.UploadFacts(
                uploaded_sha256=sink.digest.hexdigest(), validated=note is None,
                original_filename=_client_name(client_name)))
        await fan.publish(manifest)
        await stats.catalog_changed(s.redis, s.keys)
    except BaseException:
        if fan is not None:
            await asyncio.shield(fan.abort())
        raise
    finally:
        if seal is not None:
            await asyncio.to_thread(seal.close)
        await asyncio.to_thread(spool.unlink, missing_ok=True)
    return await s.catalog.manifest(target.id, name)
