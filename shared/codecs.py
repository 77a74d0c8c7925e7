"""gzip codecs shared by the worker's pipeline and the API's upload validation.

python-isal gives standard gzip output ~10x faster than stdlib zlib; zlib is the fallback.
Stages are sync objects with `feed`/`flush` (httpx decoder style): pure and testable.
"""

from __future__ import annotations

import types
import zlib
from typing import Protocol

from shared.errors import PipelineError

CHUNK = 1 << 20
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


