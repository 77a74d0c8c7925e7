"""The codec chain: how a dump's bytes become a stored file and back.

One module per codec (`gzip`, `zstd`, `age`), what they share in `base`; this module is
the registry and the decoding loop. A chain is a list of steps recorded in the manifest,
outermost last, e.g.
`[{"codec": "zstd", "level": 3}, {"codec": "age", "recipients": ["sha256:…"]}]` for a
`.sql.zst.age` file: dump → zstd → age → stored. Two registries (httpx's
`SUPPORTED_DECODERS` + `MultiDecoder` pattern):

* ENCODERS: push stages (`feed(bytes) -> bytes`, `flush() -> bytes`) used by the backup
  pipeline, in chain order.
* DECODERS: pull readers wrapping a readable (`read(n) -> bytes`, at most n bytes), stacked in
  reverse chain order. Every decoder bounds its output per call, so a 1 MiB block that
  inflates to gigabytes never sits in memory, and rejects truncated input.

`PlainReader` is the one decoding loop: hashes the stored bytes, decodes the chain, bounds the
inflation and verifies the sha256 before reporting the end. Old manifests
(`"compression": {"algorithm": "gzip"}`) map to a `gzip` chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from shared.codecs.age import (
    AgeEncrypt,
    AgeReader,
    identities_from_file,
    load_identities,
    recipient_fingerprint,
)
from shared.codecs.base import (
    AGE_MAGIC,
    CHUNK,
    GZIP_MAGIC,
    READ_BLOCK,
    ZSTD_MAGIC,
    AgeKey,
    Readable,
    Stage,
    Step,
    corrupt,
)
from shared.codecs.gzip import GZIP_IMPL, GzipCompress, GzipDecompress, GzipReader
from shared.codecs.zstd import ZstdCompress, ZstdFrames, ZstdReader
from shared.errors import IntegrityError, PipelineError

__all__ = [
    "AGE_MAGIC", "CHUNK", "GZIP_MAGIC", "READ_BLOCK", "ZSTD_MAGIC", "AgeEncrypt", "AgeKey",
    "AgeReader",
    "GZIP_IMPL", "GzipCompress", "GzipDecompress", "GzipReader", "Readable", "Stage", "Step",
    "ZstdCompress", "ZstdFrames", "ZstdReader", "identities_from_file", "load_identities",
    "recipient_fingerprint",
]


class AutoReader:
    """Inside an encrypted upload that could not be opened when it arrived: decode gzip or
    zstd when the first bytes say so, else pass the bytes through."""

    def __init__(self, src: Readable, step: Step, identities: Sequence[AgeKey]) -> None:
        head = b""
        while len(head) < 4:
            more = src.read(4 - len(head))
            if not more:
                break
            head += more
        self._head = head
        inner = _Prefixed(head, src)
        kind = sniff(head)
        self._r: Readable = (GzipReader(inner, step, identities) if kind == "gzip" else
                             ZstdReader(inner, step, identities) if kind == "zstd" else inner)

    def read(self, n: int) -> bytes:
        return self._r.read(n)


class _Prefixed:
    def __init__(self, head: bytes, src: Readable) -> None:
        self._head, self._src = head, src

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._src.read(n)


# ---------------------------------------------------------------------------- registry
ENCODERS: dict[str, Callable[[Step], Stage]] = {
    "gzip": lambda s: GzipCompress(int(s.get("level", 1))),
    "zstd": lambda s: ZstdCompress(int(s.get("level", 3)), int(s.get("threads", 0))),
    "age": lambda s: AgeEncrypt(s["recipient_keys"]),
}
DECODERS: dict[str, Callable[[Readable, Step, Sequence[AgeKey]], Readable]] = {
    "gzip": GzipReader,
    "zstd": ZstdReader,
    "age": AgeReader,
    "auto": AutoReader,
}
CONTENT_TYPES = {"gzip": "application/gzip", "zstd": "application/zstd",
                 "age": "application/octet-stream"}


def encoders(chain: Sequence[Step]) -> list[Stage]:
    return [ENCODERS[step["codec"]](step) for step in chain]


def recorded(chain: Sequence[Step]) -> list[Step]:
    """What the manifest keeps of a chain: parameters, never keys."""
    out: list[Step] = []
    for step in chain:
        kept = step.copy()
        kept.pop("recipient_keys", None)
        out.append(kept)
    return out


def _step(raw: Mapping[str, object]) -> Step:
    """A recorded step, read back: a codec Safehold knows, and of its parameters only those
    of the right type (a decoder needs none of them: they are the record of how it was
    made)."""
    codec = raw.get("codec")
    if codec not in DECODERS or not isinstance(codec, str):  # (unhashable: TypeError)
        raise corrupt(f"the manifest names an unknown codec: {str(codec)[:40]!r}")
    step = Step(codec=codec)
    level, threads = raw.get("level"), raw.get("threads")
    if isinstance(level, int) and not isinstance(level, bool):
        step["level"] = level
    if isinstance(threads, int) and not isinstance(threads, bool):
        step["threads"] = threads
    if isinstance(implementation := raw.get("implementation"), str):
        step["implementation"] = implementation
    recipients = raw.get("recipients")
    if isinstance(recipients, list) and all(isinstance(r, str) for r in recipients):
        step["recipients"] = list(recipients)
    return step


def chain_of(manifest: Mapping[str, object]) -> list[Step]:
    """The decoding chain of a stored backup, from its manifest: `codecs`, or an older
    manifest's `compression` ({"algorithm": "gzip"} or null). Only a hand-written manifest
    silent on both falls back to the file name's suffixes."""
    chain = manifest.get("codecs")
    if chain is None and "compression" in manifest:
        comp = manifest.get("compression")
        chain = [{"codec": "gzip"}] if isinstance(comp, Mapping) and comp else []
    elif chain is None:
        name = str(manifest.get("filename", ""))
        chain = [{"codec": c} for c, suffix in (("gzip", ".gz"), ("zstd", ".zst"))
                 if f"{suffix}." in f"{name}." and not name.endswith(".json")]
        chain += [{"codec": "age"}] if name.endswith(".age") else []
    if not isinstance(chain, list) or not all(isinstance(s, Mapping) for s in chain):
        raise corrupt(f"the manifest names an unknown codec chain: {str(chain)[:200]!r}")
    try:
        return [_step(s) for s in chain]
    except PipelineError:
        raise corrupt(f"the manifest names an unknown codec chain: {str(chain)[:200]!r}"
                      ) from None


def sniff(head: bytes) -> str | None:
    """The outermost codec of a file from its first bytes (uploads), or None for plain."""
    if head.startswith(AGE_MAGIC):
        return "age"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def content_type(chain: Sequence[Step]) -> str:
    return CONTENT_TYPES[chain[-1]["codec"]] if chain else "application/octet-stream"


class ExpansionLimit(PipelineError):
    """A backup inflates past the configured bound (a decompression bomb, or a lie)."""

    code = "expansion_limit"
    status = 413


def plain_limit(stored_size: int, *, max_bytes: int, ratio: float,
                declared: int | None = None) -> int:
    """How many plain bytes a stored file may inflate to: what its manifest declares when it
    does (Safehold measured it at backup or upload time), else `ratio` × its stored size;
    never more than `max_bytes`."""
    bound = declared if declared is not None else int(stored_size * ratio) + (1 << 20)
    return min(bound, max_bytes)


class _Hashing:
    def __init__(self, src: Readable, on_stored: Callable[[int], None] | None) -> None:
        self.src, self.on_stored = src, on_stored
        self.digest = hashlib.sha256()
        self.total = 0

    def stop(self) -> None:
        src_stop = getattr(self.src, "stop", None)
        if src_stop is not None:
            src_stop()

    def read(self, n: int) -> bytes:
        block = self.src.read(n)
        if block:
            self.digest.update(block)
            self.total += len(block)
            if self.on_stored:
                self.on_stored(len(block))
        return block


class WindowDigests:
    """The sha256 of each WINDOW-byte slice of a stream (the last one shorter), however
    the stream is cut into chunks: 32 bytes per 4 MiB (8 MB for 1 TB), kept in one
    buffer. A restore reads a backup twice (checked whole, then loaded); the load passes
    on each window only once it hashes to what the check read."""

    WINDOW = 4 << 20

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.digests = bytearray()
        self._hash = hashlib.sha256()
        self._filled = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.window - self._filled)
            self._hash.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.window:
                self.digests += self._hash.digest()
                self._hash, self._filled = hashlib.sha256(), 0

    def finish(self) -> bytes:
        if self._filled:
            self.digests += self._hash.digest()
            self._hash, self._filled = hashlib.sha256(), 0
        return bytes(self.digests)


class PlainReader:
    """Blocking reader of a stored backup's plain content in chunks of at most CHUNK bytes.

    `raw` gives the stored bytes (a file, or a store's stream bridged to a thread). Hashes
    them as it goes: with `expect_sha256` the end of the stream is only reported after the
    digest matched (IntegrityError otherwise), so a consumer that acts at end-of-stream (a
    COMMIT) acts only on verified bytes. Stops with ExpansionLimit as soon as the output
    passes `limit`. Bytes after the end of the outermost codec are refused."""

    def __init__(self, raw: Readable, chain: Sequence[Step], *, limit: int | None = None,
                 expect_sha256: str | None = None,
                 on_stored: Callable[[int], None] | None = None,
                 identities: Sequence[AgeKey] = (), close: Callable[[], None] | None = None
                 ) -> None:
        self._hashing = _Hashing(raw, on_stored)
        self._chain = list(chain)
        self._limit = limit
        self._expect = expect_sha256
        self._close = close
        self._readers: list[Any] = []
        top: Readable = self._hashing
        for step in reversed(self._chain):  # the outermost codec reads the stored bytes
            top = DECODERS[step["codec"]](top, step, identities)
            self._readers.append(top)
        self._top = top
        self.plain_bytes = 0

    def next_chunk(self) -> bytes | None:
        out = self._top.read(CHUNK)
        if not out:
            if self._hashing.read(1):  # the outermost codec ended before the file did
                raise corrupt("the backup has data after the end of its "
                               f"{self._chain[-1]['codec'] if self._chain else 'content'}")
            self._check_digest()
            return None
        self.plain_bytes += len(out)
        if self._limit is not None and self.plain_bytes > self._limit:
            raise ExpansionLimit(
                f"the backup inflates past {self._limit:,} bytes (a decompression bomb, or "
                "not what its manifest says); stopped there. Raise [limits] "
                "max_expansion_ratio / max_restore_bytes if it is genuine")
        return out

    def _check_digest(self) -> None:
        if self._expect is not None and self._hashing.digest.hexdigest() != self._expect:
            raise IntegrityError("the backup's bytes changed while it was being read (sha256 "
                                 "no longer matches its manifest); nothing was committed")

    @property
    def sha256(self) -> str:
        return self._hashing.digest.hexdigest()

    @property
    def stored_bytes(self) -> int:
        return self._hashing.total

    def drain_stored(self) -> None:
        """Read (and hash) the rest of the stored bytes without decoding them."""
        while self._hashing.read(CHUNK):
            pass

    def stop(self) -> None:
        """From another thread: make the reading thread's next (or blocked) read fail soon,
        so that it can be awaited instead of abandoned."""
        for r in self._readers:
            if hasattr(r, "stop"):
                r.stop()
        self._hashing.stop()

    def close(self) -> None:
        for r in reversed(self._readers):
            if hasattr(r, "close"):
                r.close()
        if self._close is not None:
            self._close()

    def __iter__(self) -> Iterator[bytes]:
        while (out := self.next_chunk()) is not None:
            yield out

