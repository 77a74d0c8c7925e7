"""The Redis protocol as Safehold's Redis backups use it: arrays of bulk strings."""

from __future__ import annotations

from shared.errors import PipelineError


def resp(*parts: bytes) -> bytes:
    """One command in the Redis protocol (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out += [b"$%d\r\n" % len(p), p, b"\r\n"]
    return b"".join(out)


class RespReader:
    """Incremental parser of our own RESP stream: arrays of bulk strings only."""

    def __init__(self, max_parts: int = 64) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.max_parts = max_parts

    def feed(self, data: bytes) -> list[list[bytes]]:
        self.buf += data
        commands = []
        while (cmd := self._one()) is not None:
            commands.append(cmd)
        if self.pos > (1 << 20):
            del self.buf[: self.pos]
            self.pos = 0
        return commands

    def _line(self, at: int) -> tuple[bytes, int] | None:
        end = self.buf.find(b"\r\n", at)
        return None if end < 0 else (bytes(self.buf[at:end]), end + 2)

    def _one(self) -> list[bytes] | None:
        head = self._line(self.pos)
        if head is None:
            return None
        line, at = head
        if not line.startswith(b"*"):
            raise PipelineError(f"not a RESP backup: expected an array, got {line[:20]!r}",
                                code="corrupt_backup")
        count = int(line[1:])
        if not 0 < count <= self.max_parts:
            raise PipelineError(f"not a RESP backup: an array of {count} elements",
                                code="corrupt_backup")
        parts = []
        for _ in range(count):
            h = self._line(at)
            if h is None:
                return None
            size_line, at = h
            if not size_line.startswith(b"$"):
                raise PipelineError("not a RESP backup: expected a bulk string",
                                    code="corrupt_backup")
            size = int(size_line[1:])
            if len(self.buf) < at + size + 2:
                return None
            parts.append(bytes(self.buf[at:at + size]))
            at += size + 2
        self.pos = at
        return parts

    def finish(self) -> None:
        if self.pos < len(self.buf):
            raise PipelineError("the RESP backup ends in the middle of a command",
                                code="corrupt_backup")
