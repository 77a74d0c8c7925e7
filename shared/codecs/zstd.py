"""zstd: push compression (optionally multi-threaded), bounded pull decompression that
walks frames (a truncated or padded file is refused)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.codecs.base import READ_BLOCK, AgeKey, Readable, Step, corrupt


# ---------------------------------------------------------------------------- zstd
class ZstdCompress:
    def __init__(self, level: int = 3, threads: int = 0) -> None:
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, write_checksum=True)
        self._c = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class ZstdFrames:
    """Follows the zstd frame structure of the compressed bytes (frame header, block
    headers, checksum; skippable frames) so that a stream cut mid-frame is detected:
    `zstandard`'s stream reader ends silently at a truncation. Walks each fed block with an
    offset (hostile files of tiny blocks cost no copying) and keeps only an incomplete
    header between feeds."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._skip = 0  # bytes to pass over (block bodies, checksums, skippable frames)
        self._state = "magic"
        self._checksum = False

    def feed(self, data: bytes) -> None:
        self._buf = self._buf[self._pos:] + data if self._pos < len(self._buf) else data
        self._pos = 0
        while True:
            if self._skip:
                used = min(self._skip, len(self._buf) - self._pos)
                self._skip -= used
                self._pos += used
                if self._skip:
                    break
            if not self._step():
                break
        self._buf = self._buf[self._pos:]
        self._pos = 0

    def _step(self) -> bool:
        b, p = self._buf, self._pos
        left = len(b) - p
        if self._state == "magic":
            if left < 4:
                return False
            magic = int.from_bytes(b[p:p + 4], "little")
            if magic == 0xFD2FB528:
                self._state = "header"
                self._pos += 4
                return True
            if magic & 0xFFFFFFF0 == 0x184D2A50:
                if left < 8:
                    return False
                self._skip = int.from_bytes(b[p + 4:p + 8], "little")
                self._pos += 8
                return True
            raise corrupt("the backup is not valid zstd (bad frame magic)")
        if self._state == "header":
            if not left:
                return False
            fhd = b[p]
            fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            self._checksum = bool((fhd >> 2) & 1)
            size = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + \
                (1 if single and fcs_flag == 0 else (0, 2, 4, 8)[fcs_flag])
            if left < size:
                return False
            self._pos += size
            self._state = "block"
            return True
        if left < 3:  # a block header
            return False
        header = int.from_bytes(b[p:p + 3], "little")
        last, btype, bsize = header & 1, (header >> 1) & 3, header >> 3
        if btype == 3:
            raise corrupt("the backup is not valid zstd (reserved block type)")
        self._pos += 3
        self._skip = 1 if btype == 1 else bsize
        if last:
            self._state = "magic"
            self._skip += 4 if self._checksum else 0
        return True

    def at_frame_end(self) -> bool:
        return self._state == "magic" and not self._skip and self._pos >= len(self._buf)


class _FrameWatch:
    def __init__(self, src: Readable) -> None:
        self.src, self.frames, self.total = src, ZstdFrames(), 0

    def read(self, n: int) -> bytes:
        block = self.src.read(n)
        self.frames.feed(block)
        self.total += len(block)
        return block


class ZstdReader:
    def __init__(self, src: Readable, step: Step, identities: Sequence[AgeKey]) -> None:
        import zstandard

        self._zstd = zstandard
        self._watch = _FrameWatch(src)
        self._r = zstandard.ZstdDecompressor().stream_reader(
            self._watch, read_size=READ_BLOCK,  # type: ignore[arg-type]
            read_across_frames=True)

    def read(self, n: int) -> bytes:
        try:
            out = self._r.read(n)
        except self._zstd.ZstdError as exc:
            raise corrupt(f"the backup is not valid zstd: {exc}") from None
        if not out and (self._watch.total == 0 or not self._watch.frames.at_frame_end()):
            raise corrupt("the backup's zstd stream is truncated")
        return bytes(out)


