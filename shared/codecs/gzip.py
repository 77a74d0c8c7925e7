"""gzip: push compression for backups, bounded pull decompression for restores."""

from __future__ import annotations

import types
import zlib
from collections.abc import Sequence

from shared.codecs.base import GZIP_WBITS, READ_BLOCK, AgeKey, Readable, Step, corrupt

# ---------------------------------------------------------------------------- gzip
_gz: types.ModuleType
try:
    from isal import isal_zlib

    _gz, GZIP_IMPL, MAX_LEVEL = isal_zlib, "isal", 3
    _GZ_ERRORS: tuple[type[Exception], ...] = (zlib.error, isal_zlib.error)  # type: ignore[assignment]
except ImportError:  # pragma: no cover - isal has wheels for our platforms
    _gz, GZIP_IMPL, MAX_LEVEL = zlib, "zlib", 9
    _GZ_ERRORS = (zlib.error,)


class GzipCompress:
    def __init__(self, level: int = 1) -> None:
        self._c = _gz.compressobj(min(level, MAX_LEVEL), zlib.DEFLATED, GZIP_WBITS)

    def feed(self, data: bytes) -> bytes:
        out: bytes = self._c.compress(data)
        return out

    def flush(self) -> bytes:
        out: bytes = self._c.flush()
        return out


class GzipDecompress:
    """Decompresses gzip, including multi-member files (`cat a.gz b.gz`); rejects truncation.

    `push` + `pull(max_out)` bound the output per call."""

    def __init__(self) -> None:
        self._d = _gz.decompressobj(GZIP_WBITS)
        self._in_member = False
        self._pending = b""
        self._seen = False  # any input at all: an empty file is no gzip stream

    def push(self, data: bytes) -> None:
        self._seen = self._seen or bool(data)
        self._pending = self._pending + data if self._pending else data

    def pull(self, max_out: int) -> bytes:
        """Up to `max_out` bytes of output; b"" when the pushed input is used up."""
        while self._pending:
            self._in_member = True
            try:
                out: bytes = self._d.decompress(self._pending, max_out)
            except _GZ_ERRORS as exc:
                raise corrupt(f"the backup is not valid gzip: {exc}") from None
            if self._d.eof:
                self._in_member = False
                self._pending = self._d.unused_data
                self._d = _gz.decompressobj(GZIP_WBITS)
            else:
                self._pending = self._d.unconsumed_tail
            if out:
                return out
        return b""

    def flush(self) -> bytes:
        if self._in_member:
            raise corrupt("the backup's gzip stream is truncated")
        if not self._seen:
            raise corrupt("the backup is empty: not even a gzip header")
        return b""


class GzipReader:
    def __init__(self, src: Readable, step: Step, identities: Sequence[AgeKey]) -> None:
        self._src = src
        self._d = GzipDecompress()

    def read(self, n: int) -> bytes:
        while True:
            if out := self._d.pull(n):
                return out
            block = self._src.read(READ_BLOCK)
            if not block:
                self._d.flush()
                return b""
            self._d.push(block)


