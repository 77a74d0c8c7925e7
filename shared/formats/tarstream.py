"""A push parser for tar streams (ustar, GNU long names, PAX path records), with bounded
memory: the MongoDB validator (sync) and the MongoDB restore (async) drive the same parser.

`push(bytes)`, then `next_event()` until it answers None (it needs more input):
`("file", name, size)`, `("data", bytes)` (at most CHUNK bytes each), `("end", "")` after a
file's data, `("eof", "")` at the end-of-archive block. Other member types are skipped;
PAX and long-name records larger than MAX_META are refused, as is a corrupt header.
"""

from __future__ import annotations

import tarfile

from shared.errors import PipelineError

BLOCK = 512
CHUNK = 1 << 20
MAX_META = 1 << 20  # a PAX header or GNU long name holds a path, not megabytes

Event = tuple[str, object]


def _bad(what: str) -> PipelineError:
    return PipelineError(f"not a valid tar stream: {what}", code="corrupt_backup")


def pax_path(data: bytes) -> str | None:
    """The `path` record of a PAX extended header, if any."""
    path, at = None, 0
    while at < len(data):
        space = data.find(b" ", at)
        if space < 0 or not data[at:space].isdigit():
            raise _bad("a malformed PAX record")
        length = int(data[at:space])
        if length <= space - at:
            raise _bad("a malformed PAX record")
        key, _, value = data[space + 1:at + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        at += length
    return path


class TarReader:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._left = 0  # data bytes left in the current member
        self._pad = 0  # padding after it
        self._meta: bytearray | None = None  # collecting a PAX / long-name record
        self._meta_type = b""
        self._skip = False  # the current member's data is skipped (not a regular file)
        self._in_file = False
        self._long_name: str | None = None

    def push(self, data: bytes) -> None:
        if self._pos > CHUNK:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += len(out)
        return out

    def next_event(self) -> Event | None:
        while True:
            avail = len(self._buf) - self._pos
            if self._left:
                if not avail:
                    return None
                data = self._take(min(self._left, avail, CHUNK))
                self._left -= len(data)
                if self._meta is not None:
                    self._meta += data
                    if not self._left:
                        self._end_meta()
                    continue
                if self._skip:
                    continue
                return ("data", data)
            if self._pad:
                if avail < self._pad:
                    return None
                self._pos += self._pad
                self._pad = 0
                continue
            if self._in_file:
                self._in_file = False
                return ("end", "")
            if avail < BLOCK:
                return None
            header = self._take(BLOCK)
            if header == b"\0" * BLOCK:
                return ("eof", "")
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise _bad(str(exc)) from None
            self._left, self._pad = info.size, -info.size % BLOCK
            if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE):
                if info.size > MAX_META:
                    raise _bad(f"an extended header of {info.size} bytes")
                self._meta, self._meta_type = bytearray(), info.type
                if not self._left:
                    self._end_meta()
                continue
            name = self._long_name or info.name
            self._long_name = None
            self._skip = not info.isfile()
            if self._skip:
                continue
            self._in_file = True
            return ("file", (name, info.size))

    def _end_meta(self) -> None:
        data, kind = bytes(self._meta or b""), self._meta_type
        self._meta = None
        if kind == tarfile.GNUTYPE_LONGNAME:
            self._long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == tarfile.XHDTYPE:
            self._long_name = pax_path(data) or self._long_name
