"""gzip codecs shared by the worker's pipeline and the API's upload validation.

python-isal gives standard gzip output ~10x faster than stdlib zlib; zlib is the fallback.
Stages are sync objects with `feed`/`flush` (httpx decoder style): pure and testable.
"""

from __future__ import annotations

import hashlib
import os
import types
import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

from shared.errors import PipelineError

CHUNK = 1 << 20
READ_BLOCK = 256 * 1024  # compressed input per read: bounds the output of one pull
GZIP_WBITS = 31  # gzip container
GZIP_MAGIC = b"\x1f\x8b"


class Stage(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


_gz: types.ModuleType
try:
    from isal import isal_zlib

    _gz, GZIP_IMPL, MAX_LEVEL = isal_zlib, "isal", 3
    _GZ_ERRORS: tuple[type[Exception], ...] = (zlib.error, isal_zlib.error)  # type: ignore[assignment]
except ImportError:  # pragma: no cover - isal has wheels for our platforms
    _gz, GZIP_IMPL, MAX_LEVEL = zlib, "zlib", 9
    _GZ_ERRORS = (zlib.error,)


class GzipCompress:
    def __init__(self, level: int) -> None:
        self._c = _gz.compressobj(min(level, MAX_LEVEL), zlib.DEFLATED, GZIP_WBITS)

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class GzipDecompress:
    """Decompresses gzip, including multi-member files (`cat a.gz b.gz`); rejects truncation.

    `push` + `pull(max_out)` bound the output per call: a 1 MiB block of a highly
    compressible dump can inflate to hundreds of MiB, which must never sit in memory.
    """

    def __init__(self) -> None:
        self._d = _gz.decompressobj(GZIP_WBITS)
        self._in_member = False
        self._pending = b""

    def push(self, data: bytes) -> None:
        self._pending = self._pending + data if self._pending else data

    def pull(self, max_out: int) -> bytes:
        """Up to `max_out` bytes of output; b"" when the pushed input is used up."""
        while self._pending:
            self._in_member = True
            try:
                out = self._d.decompress(self._pending, max_out)
            except _GZ_ERRORS as exc:
                raise PipelineError(f"the backup is not valid gzip: {exc}",
                                    code="corrupt_backup") from None
            if self._d.eof:
                self._in_member = False
                self._pending = self._d.unused_data
                self._d = _gz.decompressobj(GZIP_WBITS)
            else:
                self._pending = self._d.unconsumed_tail
            if out:
                return out
        return b""

    def feed(self, data: bytes) -> bytes:
        self.push(data)
        return b"".join(iter(lambda: self.pull(CHUNK), b""))

    def flush(self) -> bytes:
        if self._in_member:
            raise PipelineError("the backup's gzip stream is truncated", code="corrupt_backup")
        return b""




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


class PlainReader:
    """Blocking reader of a stored backup's plain content in chunks of at most CHUNK bytes.

    Hashes the stored bytes as it goes: with `expect_sha256`, the end of the stream is only
    reported after the digest matched (IntegrityError otherwise), so a consumer that acts at
    end-of-stream (a COMMIT) acts only on verified bytes. Stops with ExpansionLimit as soon
    as the output passes `limit`."""

    def __init__(self, path: str | os.PathLike[str], *, compressed: bool,
                 limit: int | None = None, expect_sha256: str | None = None,
                 on_stored: Callable[[int], None] | None = None) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._gunzip = GzipDecompress() if compressed else None
        self._limit = limit
        self._expect = expect_sha256
        self._on_stored = on_stored
        self._digest = hashlib.sha256()
        self.plain_bytes = 0

    def next_chunk(self) -> bytes | None:
        out = self._next()
        if out is None:
            return None
        self.plain_bytes += len(out)
        if self._limit is not None and self.plain_bytes > self._limit:
            raise ExpansionLimit(
                f"the backup inflates past {self._limit:,} bytes (a decompression bomb, or "
                "not what its manifest says); stopped there. Raise [limits] "
                "max_expansion_ratio / max_restore_bytes if it is genuine")
        return out

    def _next(self) -> bytes | None:
        gunzip = self._gunzip
        while True:
            if gunzip is not None and (out := gunzip.pull(CHUNK)):
                return out
            block = self._f.read(READ_BLOCK if gunzip is not None else CHUNK)
            if not block:
                if gunzip is not None:
                    gunzip.flush()  # raises if the last member is incomplete
                self._check_digest()
                return None
            self._digest.update(block)
            if self._on_stored:
                self._on_stored(len(block))
            if gunzip is None:
                return block
            gunzip.push(block)

    def _check_digest(self) -> None:
        if self._expect is not None and self._digest.hexdigest() != self._expect:
            from shared.errors import IntegrityError

            raise IntegrityError("the backup's bytes changed while it was being read (sha256 "
                                 "no longer matches its manifest); nothing was committed")

    def close(self) -> None:
        self._f.close()

    def __iter__(self) -> Iterator[bytes]:
        while (out := self.next_chunk()) is not None:
            yield out
