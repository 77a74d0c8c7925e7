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
from pathlib import Path
from typing import BinaryIO

from shared.errors import PipelineError

MAGIC = b"\xfebin"
HEADER = 19
MAX_EVENT = 1 << 30  # max_allowed_packet's ceiling: a larger size is a corrupt file
STOP, ROTATE, FORMAT_DESCRIPTION, XID, TABLE_MAP = 3, 4, 15, 16, 19
QUERY = 2
XA_PREPARE = 38  # MariaDB: the end of an XA PREPARE group
FL_STANDALONE, FL_PREPARED_XA = 0x01, 0x40  # a GTID event's flags
GTID = 162  # MariaDB's GTID event: a transaction starts
GTID_LIST = 163  # MariaDB: at a file's start, the binlog's GTID state before it
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
    data: bytes  # the whole event, header included (EventScanner: see there)
    at: int = -1  # EventScanner: where it starts in the file scanned

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


KEEP_MAX = 64 << 10  # a GTID list event's bytes an EventScanner keeps at most
SCAN_BLOCK = 1 << 20


class EventScanner:
    """A binlog file being written, scanned in place, a MiB at a time: each call yields the
    events complete in it since the last, each with its offset and only its header (the
    whole event for a GTID or a GTID list, what GtidRange reads) — never an event's body,
    so an event of any size costs no memory; its bytes are read from the file again when
    shipped."""

    def __init__(self) -> None:
        self.offset = 0  # the next event's start in the file (0: the magic is unchecked)

    def scan(self, f: BinaryIO, budget: int) -> tuple[list[Event], bool]:
        """Complete events from `offset` on, covering about `budget` bytes at most; and
        whether the file holds more after them (an event being written, or past the
        budget)."""
        end = f.seek(0, 2)
        if self.offset == 0:
            if end < 4:
                return [], False
            f.seek(0)
            if f.read(4) != MAGIC:
                raise PipelineError("not a binlog file (no \\xfebin magic)",
                                    code="corrupt_binlog")
            self.offset = 4
        out: list[Event] = []
        buf, base = b"", self.offset  # buf holds the file's bytes from `base`
        while end - self.offset >= HEADER and budget > 0:
            at = self.offset - base
            if at + HEADER > len(buf):
                f.seek(self.offset)
                buf, base, at = f.read(min(SCAN_BLOCK, end - self.offset)), self.offset, 0
            ts, kind, server, size, log_pos, _flags = struct.unpack_from("<IBIIIH", buf, at)
            if not HEADER <= size <= MAX_EVENT or (log_pos and log_pos < size):
                raise PipelineError(f"a binlog event of {size} bytes ending at {log_pos}: "
                                    "the file is corrupt", code="corrupt_binlog")
            if end - self.offset < size:
                break
            keep = min(size, KEEP_MAX) if kind in (GTID, GTID_LIST) else HEADER
            if at + keep > len(buf):
                f.seek(self.offset)
                buf, base, at = f.read(max(keep, min(SCAN_BLOCK, end - self.offset))), \
                    self.offset, 0
            out.append(Event(ts, kind, server, size, log_pos, buf[at:at + keep], self.offset))
            self.offset += size
            budget -= size
        return out, self.offset < end


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


# MariaDB GTIDs: `domain-server-seq` (a list: one per domain, comma-separated)
GTID_TEXT = re.compile(r"([0-9]{1,10})-([0-9]{1,10})-([0-9]{1,20})")


def gtid_of(ev: Event) -> tuple[int, int, int] | None:
    """(domain, server id, sequence number) of a MariaDB GTID event (a transaction's
    first event), else None."""
    if ev.type != GTID or len(ev.data) < HEADER + 12:
        return None
    seq, domain = struct.unpack_from("<QI", ev.data, HEADER)
    return domain, ev.server_id, seq


Gtids = dict[int, tuple[int, int]]  # domain -> (server id, sequence number)


def gtid_text(gtids: Gtids) -> str:
    return ",".join(f"{d}-{s}-{n}" for d, (s, n) in sorted(gtids.items()))


def parse_gtids(text: object) -> Gtids | None:
    """A GTID list as MariaDB writes it (`0-1-42,1-2-7`; empty: none), at most one GTID
    per domain, every number in range; else None."""
    if not isinstance(text, str) or len(text) > 4000:
        return None
    out: Gtids = {}
    for item in filter(None, text.split(",")):
        m = GTID_TEXT.fullmatch(item.strip())
        if m is None:
            return None
        domain, server, seq = int(m[1]), int(m[2]), int(m[3])
        if domain >= 1 << 32 or server >= 1 << 32 or seq >= 1 << 64 or domain in out:
            return None
        out[domain] = (server, seq)
    return out


def _gtid_list(ev: Event) -> Gtids:
    """A GTID list event's state: the last GTID of each domain (one per domain-server)."""
    out: Gtids = {}
    if len(ev.data) < HEADER + 4:
        return out
    count = struct.unpack_from("<I", ev.data, HEADER)[0] & 0x0FFFFFFF
    for i in range(min(count, (len(ev.data) - HEADER - 4) // 16)):
        domain, server, seq = struct.unpack_from("<IIQ", ev.data, HEADER + 4 + 16 * i)
        if seq > out.get(domain, (0, -1))[1]:
            out[domain] = (server, seq)
    return out


class GtidRange:
    """The first and last GTID of each domain in a stretch of events, and where they
    changed course against what came before (`known`: the last GTID of each domain so
    far): a domain beginning after others, a domain's sequence going back. An archive's
    first events know what came before from their file's GTID list event (the server's
    state when it began the file), else from the first GTID."""

    def __init__(self, known: Gtids | None = None) -> None:
        self.known: Gtids = dict(known or {})
        self.first: Gtids = {}
        self.last: Gtids = {}
        self.changes: list[tuple[int, str]] = []  # (the GTID event's offset, what)

    def add(self, events: list[Event]) -> None:
        for ev in events:
            if ev.type == GTID_LIST and not self.known:  # what came before: no change
                self.known = _gtid_list(ev)
            if (g := gtid_of(ev)) is None:
                continue
            domain, server, seq = g
            before = self.known.get(domain)
            if before is None and self.known:
                self.changes.append((ev.start, (
                    f"GTID domain {domain} begins ({domain}-{server}-{seq}) after "
                    f"{gtid_text(self.known)}: the server's gtid_domain_id changed, or it "
                    "writes another primary's transactions")[:300]))
            elif before is not None and seq <= before[1]:
                self.changes.append((ev.start, (
                    f"GTID sequence of domain {domain} went back ({domain}-{before[0]}-"
                    f"{before[1]}, then {domain}-{server}-{seq}): gtid_seq_no was set, or "
                    "another primary's history follows")[:300]))
            self.known[domain] = (server, seq)
            self.first.setdefault(domain, (server, seq))
            self.last[domain] = (server, seq)

    def merge(self, later: GtidRange) -> None:
        """Take on a later stretch's GTIDs (and its changes, judged against its own)."""
        for domain, first in later.first.items():
            self.first.setdefault(domain, first)
        self.last.update(later.last)
        self.known.update(later.known)
        self.changes += later.changes

    def facts(self) -> dict[str, object]:
        return {"gtid_first": gtid_text(self.first), "gtid_last": gtid_text(self.last)} \
            if self.first else {}


def _query_text(ev: Event, checksum: bool) -> bytes:
    """A query event's statement (its status variables and database name skipped, and
    the event's CRC32 when the file has checksums)."""
    body = ev.data[HEADER:len(ev.data) - 4 if checksum else None]
    if len(body) < 13:
        return b""
    db_len, status_len = body[8], struct.unpack_from("<H", body, 11)[0]
    return body[13 + status_len + db_len + 1:]


def _checksummed(fde: Event) -> bool:
    """A format description says whether its file's events end with a CRC32: its
    checksum algorithm is the byte before its own 4-byte checksum (1: CRC32)."""
    return len(fde.data) > HEADER + 57 + 5 and fde.data[-5] == 1


def gtid_stop(paths: list[Path], start: int, want: tuple[int, int, int]
              ) -> tuple[int, int] | str:
    """Where the transaction of GTID `want` (domain, server, seq) ends in staged binlog
    files read from offset `start` of the first: (the file's index, the offset just past
    its commit — the decoder's exclusive --stop-position). Else why not, as text: not
    there (the domain went past it), or its commit not archived yet."""
    found = standalone = prepared = checksum = False
    for index, path in enumerate(paths):
        reader = EventReader()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                for ev in reader.feed(chunk):
                    if ev.type == FORMAT_DESCRIPTION and ev.log_pos:
                        checksum = _checksummed(ev)
                    if index == 0 and ev.start < start:
                        continue
                    g = gtid_of(ev)
                    if found:
                        if g is not None:  # the next transaction: this one ended before
                            return index, ev.start
                        if standalone or ev.type == XID or prepared and \
                                ev.type == XA_PREPARE or ev.type == QUERY and \
                                _query_text(ev, checksum) in (b"COMMIT", b"ROLLBACK"):
                            return index, ev.log_pos
                        continue
                    if g == want:
                        found = True
                        flags = ev.data[HEADER + 12] if len(ev.data) > HEADER + 12 else 0
                        # (an XA PREPARE group ends with its XA_PREPARE event)
                        prepared = bool(flags & FL_PREPARED_XA)
                        standalone = bool(flags & FL_STANDALONE) and not prepared
                    elif g is not None and g[0] == want[0] and g[2] > want[2]:
                        return (f"no transaction with GTID {want[0]}-{want[1]}-{want[2]} in "
                                "the archived binlog (its domain went on to "
                                f"{g[0]}-{g[1]}-{g[2]})")
    return (f"the commit of GTID {want[0]}-{want[1]}-{want[2]} is not archived yet"
            if found else f"GTID {want[0]}-{want[1]}-{want[2]} is not in the archived "
            "binlog yet")
