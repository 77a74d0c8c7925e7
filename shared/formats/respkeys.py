"""Some keys of a Redis RESP backup (issue 25's `"keys": ["session:*"]`): the `SELECT n`
commands and the `RESTORE key …` commands whose key matches a pattern pass, byte for byte;
every other command is skipped. Streaming: a command's first two arguments (its name and
key) are held to decide, the rest (a DUMP payload of any size) flows through or is skipped
as it comes. Patterns are Redis's glob (`*`, `?`, `[a-z]`, `[^x]`, `\\` escapes).

`move` (a restore beside the live database): each `SELECT n` is rewritten to the database
index it maps n to; a SELECT of a database it does not map is refused."""

from __future__ import annotations

import re

from shared.errors import PipelineError

MAX_KEY = 1 << 16  # a key longer than this is not filtered (refused)
_LINE_MAX = 32


def redis_glob(pattern: bytes) -> re.Pattern[bytes]:
    """Redis's `stringmatchlen` as a regular expression."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i:i + 1]
        if c == b"*":
            out.append(b".*")
        elif c == b"?":
            out.append(b".")
        elif c == b"\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1:i + 2]))
            i += 1
        elif c == b"[" and (j := pattern.find(b"]", i + 2)) > 0:
            inner = pattern[i + 1:j]
            negate = inner.startswith(b"^")
            inner = inner[1:] if negate else inner
            parts = []
            k = 0
            while k < len(inner):
                if inner[k:k + 1] == b"-" and 0 < k < len(inner) - 1:
                    parts.append(b"-")
                elif inner[k:k + 1] == b"\\" and k + 1 < len(inner):
                    k += 1
                    parts.append(re.escape(inner[k:k + 1]))
                else:
                    parts.append(re.escape(inner[k:k + 1]))
                k += 1
            out.append(b"[" + (b"^" if negate else b"") + b"".join(parts) + b"]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile(b"".join(out) + rb"\Z", re.S)


class KeyFilter:
    def __init__(self, patterns: list[str] | None, move: dict[int, int] | None = None
                 ) -> None:
        """`patterns` None: every key."""
        self.patterns = None if patterns is None else [redis_glob(p.encode())
                                                       for p in patterns]
        self.move = move or None
        self.kept = self.skipped = 0
        self._buf = bytearray()
        self._args_left = 0  # of the current command
        self._held: list[bytes] = []  # its first arguments, as bytes on the wire
        self._first: list[bytes] = []  # their values
        self._keep: bool | None = None  # decided once name and key are known
        self._bulk_left = 0  # bytes of the current long argument still to pass or skip
        self._pos = 0
        self._last2 = b""

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out: list[bytes] = []
        self._pos = 0  # where in the buffer the next token starts (compacted once, below)
        while self._step(out):
            pass
        del self._buf[:self._pos]
        return b"".join(out)

    def finish(self) -> None:
        if self._buf or self._args_left or self._bulk_left:
            raise PipelineError("the RESP stream ends inside a command", code="corrupt_backup")

    def _step(self, out: list[bytes]) -> bool:
        buf, pos = self._buf, self._pos
        if self._bulk_left:  # a long argument flows through
            n = min(self._bulk_left, len(buf) - pos)
            if not n:
                return False
            piece = bytes(buf[pos:pos + n])
            if self._keep:
                out.append(piece)
            self._last2 = (self._last2 + piece[-2:])[-2:]
            self._pos += n
            self._bulk_left -= n
            if not self._bulk_left:
                if self._last2 != b"\r\n":
                    raise PipelineError("not a RESP backup (a bulk string's end)",
                                        code="corrupt_backup")
                self._args_left -= 1
                self._end_if_done()
            return True
        line_end = buf.find(b"\r\n", pos, pos + _LINE_MAX)
        if line_end < 0:
            if len(buf) - pos >= _LINE_MAX:
                raise PipelineError("not a RESP backup (a header line too long)",
                                    code="corrupt_backup")
            return False
        line = bytes(buf[pos:line_end])
        if not self._args_left:  # a command starts
            if not (line.startswith(b"*") and line[1:].isdigit() and int(line[1:]) > 0):
                raise PipelineError(f"not a RESP backup ({line[:20]!r})", code="corrupt_backup")
            self._args_left = int(line[1:])
            self._held, self._first, self._keep = [line + b"\r\n"], [], None
            self._pos = line_end + 2
            return True
        if not (line.startswith(b"$") and line[1:].isdigit()):
            raise PipelineError(f"not a RESP backup ({line[:20]!r})", code="corrupt_backup")
        size = int(line[1:])
        if self._keep is None:  # name, then key: held whole to decide
            if size > MAX_KEY:
                raise PipelineError("a key longer than 64 KiB", code="corrupt_backup")
            end = line_end + 2 + size + 2
            if len(buf) < end:
                return False
            if buf[end - 2:end] != b"\r\n":
                raise PipelineError("not a RESP backup (a bulk string's end)",
                                    code="corrupt_backup")
            self._held.append(bytes(buf[pos:end]))
            self._first.append(bytes(buf[line_end + 2:end - 2]))
            self._pos = end
            self._args_left -= 1
            self._decide()
            if self._keep and self._held:
                out.append(b"".join(self._held))
                self._held = []
            self._end_if_done()
            return True
        if self._keep:
            out.append(bytes(buf[pos:line_end + 2]))
        self._pos = line_end + 2
        self._bulk_left, self._last2 = size + 2, b""
        return True

    def _decide(self) -> None:
        name = self._first[0].upper() if self._first else b""
        if name == b"SELECT" and self.move is None:
            self._keep = True
        elif name == b"SELECT" and len(self._first) >= 2:
            db = self._first[1]
            into = self.move.get(int(db)) if self.move and db.isdigit() else None
            if self._args_left or into is None:
                raise PipelineError(f"SELECT {db[:8]!r} is not the database this restore "
                                    "moves", code="corrupt_backup")
            self._keep = True
            self._held = [b"*2\r\n$6\r\nSELECT\r\n"
                          + b"$%d\r\n%d\r\n" % (len(b"%d" % into), into)]
        elif len(self._first) >= 2 and name != b"SELECT":
            self._keep = name == b"RESTORE" and (self.patterns is None or any(
                p.match(self._first[1]) for p in self.patterns))
            if self._keep:
                self.kept += 1
            else:
                self.skipped += 1
        elif not self._args_left:
            self._keep = False

    def _end_if_done(self) -> None:
        if not self._args_left and self._bulk_left == 0:
            self._keep, self._held, self._first = None, [], []
