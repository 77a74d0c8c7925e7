"""MySQL/MariaDB binary logs, event by event (issue 26's archive).

A binlog file is the magic `\\xfebin` then events, each with a 19-byte header: timestamp
(u32, seconds), type (u8), server id (u32), size (u32, header and checksum included),
`log_pos` (u32: where the event ends in its file) and flags (u16). What
`mariadb-binlog --read-from-remote-server --raw` writes is the same, with events the
server made up for the connection (a format description, a rotate: `log_pos` 0) where it
resumes mid-file; the real ones say where they stood in the server's file, so a shipment
is always those exact bytes of it.

A position in a target's binlogs is one integer: the file's number (`binlog.000042`) in
the high 32 bits, the byte offset in the low 32 (files are at most 4 GiB); the end of a
complete file is the start of the next (`(n + 1) << 32`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.errors import PipelineError

MAGIC = b"\xfebin"
HEADER = 19
MAX_EVENT = 1 << 30  # max_allowed_packet's ceiling: a larger size is a corrupt file
STOP, ROTATE, FORMAT_DESCRIPTION, XID, TABLE_MAP = 3, 4, 15, 16, 19
QUERY = 2
GTID = 162  # MariaDB's GTID event: a transaction starts
# a binlog position as an operator names it: `binlog.000042:1234`
BINLOG_AT = re.compile(r"([A-Za-z0-9_.-]{1,200})\.([0-9]{6,9}):([0-9]{1,10})")
_FILE = re.compile(r"^(?P<base>[A-Za-z0-9_.-]{1,200})\.(?P<n>[0-9]{6,9})\Z")


@dataclass(frozen=True)
class Event:
    timestamp: int
    type: int
    server_id: int
    size: int
    log_pos: int  # its end in the server's file; 0: made up for the connection
    data: bytes  # the whole event, header included

    @property
    def start(self) -> int:
        return self.log_pos - self.size


def file_parts(name: str) -> tuple[str, int] | None:
    """(basename, number) of a binlog file name (`binlog.000042`), or None."""
    m = _FILE.match(name)
    return (m["base"], int(m["n"])) if m else None


def position(number: int, offset: int) -> int:
    return (number << 32) | offset


def position_text(pos: int) -> str:
    return f"{pos >> 32:06d}:{pos & 0xFFFFFFFF}"


class EventReader:
    """Feed a binlog file's bytes in order; `events()` yields each complete event once."""

    def __init__(self, *, magic: bool = True) -> None:
        self._buf = bytearray()
        self._magic = magic  # the file's first 4 bytes are still to check
        self.offset = 0  # bytes of the input consumed (events and magic)

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        out: list[Event] = []
        at = 0
        if self._magic:
            if len(self._buf) < 4:
                return out
            if bytes(self._buf[:4]) != MAGIC:
                raise PipelineError("not a binlog file (no \\xfebin magic)",
                                    code="corrupt_binlog")
            self._magic, at = False, 4
        while len(self._buf) - at >= HEADER:
            ts, kind, server, size, log_pos, _flags = struct.unpack_from("<IBIIIH",
                                                                          self._buf, at)
            if not HEADER <= size <= MAX_EVENT or (log_pos and log_pos < size):
                raise PipelineError(f"a binlog event of {size} bytes ending at {log_pos}: "
                                    "the file is corrupt", code="corrupt_binlog")
            if len(self._buf) - at < size:
                break
            out.append(Event(ts, kind, server, size, log_pos, bytes(self._buf[at:at + size])))
            at += size
        del self._buf[:at]
        self.offset += at
        return out

    @property
    def pending(self) -> int:
        """Bytes of an event not complete yet."""
        return len(self._buf)


_HEAD_POSITION = re.compile(
    rb"^-- CHANGE (?:MASTER|REPLICATION SOURCE) TO (?:MASTER|SOURCE)_LOG_FILE='"
    rb"([A-Za-z0-9_.-]{1,200})', (?:MASTER|SOURCE)_LOG_POS=([0-9]{1,10});\r?$", re.M)
_FIRST_TABLE = b"\n-- Table structure for table "
HEAD_MAX = 1 << 20


class DumpPosition:
    """The binlog position a `--master-data=2` / `--source-data=2` dump writes in its header
    (a comment before the first table, so never a table's data or a routine's body) and
    when it was read: the snapshot was taken by then. Fed the dump's first chunks."""

    def __init__(self) -> None:
        self._head = bytearray()
        self.found: tuple[str, int, datetime] | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._head += data[:HEAD_MAX]
        end = self._head.find(_FIRST_TABLE)
        head = bytes(self._head if end < 0 else self._head[:end])
        if m := _HEAD_POSITION.search(head):
            self.found = (m[1].decode(), int(m[2]), datetime.now(UTC))
            self.done = True
        elif end >= 0 or len(self._head) >= HEAD_MAX:
            self.done = True  # past the header: a later line is no header's


def parse_position(text: str) -> int | None:
    """A position as `position_text` writes it (`000042:1234`), or None."""
    number, _, offset = text.partition(":")
    if not (number.isdigit() and offset.isdigit() and len(number) <= 9 and len(offset) <= 10):
        return None
    return position(int(number), int(offset)) if int(offset) < 1 << 32 else None
