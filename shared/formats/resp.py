"""The Redis protocol as Safehold's Redis backups use it: arrays of bulk strings."""

from __future__ import annotations

from typing import Any

import hiredis

from shared.errors import PipelineError


def resp(*parts: bytes) -> bytes:
    """One command in the Redis protocol (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out += [b"$%d\r\n" % len(p), p, b"\r\n"]
    return b"".join(out)


MAX_BULK = 512 << 20  # Redis's own limit on one bulk string (proto-max-bulk-len)
# the C parser holds a command until it is complete: past this many pending bytes (a big
# key's payload, or a lie in a header) the streaming parser takes over that command
FAST_MAX_PENDING = 1 << 20
_INCOMPLETE = object()  # hiredis' "no whole reply yet" (its default, False, is also `#f`)


class RespReader:
    """Incremental parser of our own RESP stream: arrays of bulk strings only.

    Memory stays bounded whatever the input: an argument longer than `keep` bytes is not
    kept (it reads as None; a DUMP payload need not be held to check a command's shape),
    and header lines are capped."""

    def __init__(self, max_parts: int = 64, keep: int = 256, *, fast: bool = True,
                 fast_max_pending: int = FAST_MAX_PENDING) -> None:
        self.max_parts, self.keep = max_parts, keep
        self.use_fast, self.fast_max_pending = fast, fast_max_pending
        self._line = b""  # a header line cut by a chunk boundary
        self._state = "array"  # array | bulk | data
        self._parts: list[bytes | None] = []
        self._parts_left = 0
        self._data: bytearray | None = None
        self._data_left = 0
        self._last2 = b""  # the last bytes of the current bulk (its CRLF terminator)
        self._fast: hiredis.Reader | None = (hiredis.Reader(notEnoughData=_INCOMPLETE)
                                             if fast else None)
        self._pending = b""  # what the C parser holds (the start of an unfinished command)

    @staticmethod
    def _bad(what: str) -> PipelineError:
        return PipelineError(f"not a RESP backup: {what}", code="corrupt_backup")

    def _number(self, line: bytes, prefix: bytes, what: str) -> int:
        if not line.startswith(prefix) or not line[1:].isdigit():
            raise self._bad(f"expected {what}, got {line[:20]!r}")
        return int(line[1:])

    def feed(self, data: bytes) -> list[list[bytes | None]]:
        """Whole commands of `data` (and what came before it), in order.

        Most commands go through hiredis' C parser (about 15 times faster); a command
        whose bytes pile up past FAST_MAX_PENDING is handed, from its first byte, to the
        streaming parser below, which never holds a long argument; after it, the C parser
        takes over again. Both refuse the same inputs: only arrays of bulk strings.

        hiredis also reads RESP3 (sets `~`, attributes `|`, booleans `#f`, verbatim
        strings…) into the same Python values as a RESP2 array of bulks, and Redis would
        read such bytes as inline commands, line by line. So what hiredis returns is
        accepted only when the bytes it came from are, to the byte, the RESP2 encoding of
        that command: `*n` CRLF, then `$len` CRLF data CRLF per argument."""
        if self._fast is None and self.use_fast and self._state == "array" \
                and not self._line:
            self._fast, self._pending = hiredis.Reader(notEnoughData=_INCOMPLETE), b""
        if self._fast is None:
            return self._feed_streaming(data)
        fast = self._fast
        fast.feed(data)
        commands: list[list[bytes | None]] = []
        buf = self._pending + data if self._pending else data  # from the first unreturned
        pos = 0  # where in `buf` the next command starts
        pack, keep = hiredis.pack_command, self.keep
        try:
            while (cmd := fast.gets()) is not _INCOMPLETE:
                if type(cmd) is not list or not 0 < len(cmd) <= self.max_parts:
                    raise self._bad(f"a reply that is not a command of bulk strings: "
                                    f"{str(cmd)[:40]!r}")
                # the RESP2 encoding of what hiredis read, made in C, must be the very
                # bytes it read: this also refuses any element that is not a bulk string
                # (an integer, a status, a nested array encode otherwise, or not at all)
                encoded = pack(tuple(cmd))
                if not buf.startswith(encoded, pos):
                    raise self._bad(self._unlike_resp2(cmd, buf, pos))
                pos += len(encoded)
                commands.append(cmd if len(encoded) <= keep or max(map(len, cmd)) <= keep
                                else [p if len(p) <= keep else None for p in cmd])
        except PipelineError:
            raise
        except Exception as exc:  # hiredis.ProtocolError; TypeError on a RESP3 map's key
            raise self._bad(f"{type(exc).__name__}: {str(exc)[:80]}") from None
        left = len(buf) - pos  # what hiredis holds: the start of an unfinished command
        self._pending = buf[pos:] if left else b""
        if left > self.fast_max_pending:
            held, self._fast, self._pending = self._pending, None, b""
            commands += self._feed_streaming(held)
        return commands

    @staticmethod
    def _unlike_resp2(cmd: list[Any], buf: bytes, pos: int) -> str:
        """What differs between the bytes at `pos` and the RESP2 encoding of `cmd`."""
        head = b"*%d\r\n" % len(cmd)
        if not buf.startswith(head, pos):
            return f"expected an array, got {buf[pos:pos + 20]!r}"
        pos += len(head)
        for part in cmd:
            if type(part) is not bytes:
                return f"a reply that is not a command of bulk strings: {str(cmd)[:40]!r}"
            head = b"$%d\r\n" % len(part)
            if not buf.startswith(head, pos):
                return f"expected a bulk string, got {buf[pos:pos + 20]!r}"
            pos += len(head) + len(part)
            if not buf.startswith(b"\r\n", pos):
                return "a bulk string without its CRLF"
            pos += 2
        return "a command not in the RESP2 encoding"

    def _feed_streaming(self, data: bytes) -> list[list[bytes | None]]:
        commands: list[list[bytes | None]] = []
        i, n = 0, len(data)
        while i < n:
            if self._state != "data":
                j = data.find(b"\n", i)
                if j < 0:
                    self._line += data[i:]
                    if len(self._line) > 32:
                        raise self._bad("a header line that never ends")
                    break
                line, self._line, i = self._line + data[i:j + 1], b"", j + 1
                if not line.endswith(b"\r\n"):
                    raise self._bad("a header line without CRLF")
                line = line[:-2]
                if self._state == "array":
                    count = self._number(line, b"*", "an array")
                    if not 0 < count <= self.max_parts:
                        raise self._bad(f"an array of {count} elements")
                    self._parts, self._parts_left, self._state = [], count, "bulk"
                else:
                    size = self._number(line, b"$", "a bulk string")
                    if size > MAX_BULK:
                        raise self._bad(f"a bulk string of {size} bytes")
                    self._data = bytearray() if size <= self.keep else None
                    self._data_left, self._last2, self._state = size + 2, b"", "data"
                continue
            take = min(n - i, self._data_left)
            piece = data[i:i + take]
            if self._data is not None:
                self._data += piece
            self._last2 = (self._last2 + piece[-2:])[-2:]
            self._data_left -= take
            i += take
            if self._data_left:
                continue
            if self._last2 != b"\r\n":
                raise self._bad("a bulk string without its CRLF")
            self._parts.append(bytes(self._data[:-2]) if self._data is not None else None)
            self._parts_left -= 1
            if self._parts_left:
                self._state = "bulk"
            else:
                commands.append(self._parts)
                self._state = "array"
        return commands

    def finish(self) -> None:
        if self._state != "array" or self._line or self._pending:
            raise PipelineError("the RESP backup ends in the middle of a command",
                                code="corrupt_backup")
