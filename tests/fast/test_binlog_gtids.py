"""MariaDB GTIDs in the binlog archive (issue 26): each piece's first/last GTID per
domain and where they changed course (a domain beginning after others, a sequence going
back); a manifest's GTID claims parsed strictly (shown, never obeyed); where a GTID's
transaction ends in staged binlog (the replay's stop), or why it cannot be found."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.binlog_window import piece
from shared.errors import PipelineError
from shared.formats.binlog import (
    QUERY,
    XID,
    Event,
    EventReader,
    GtidRange,
    gtid_stop,
    gtid_text,
    parse_gtids,
)
from shared.naming import archive_name

GTID, GTID_LIST, TABLE_MAP, ROWS, ROTATE, FDE = 162, 163, 19, 30, 4, 15


def event(kind: int, body: bytes, server: int = 1) -> tuple[int, int, bytes]:
    return kind, server, body


def gtid(domain: int, seq: int, server: int = 1, standalone: bool = False
         ) -> tuple[int, int, bytes]:
    return GTID, server, struct.pack("<QIB", seq, domain, 1 if standalone else 0) + b"\0" * 6


# a format description saying its file's events end with a CRC32 (algorithm 1)
CRC_FDE = (FDE, 1, b"\0" * 67 + b"\x01crc!")


def query(text: bytes, crc: bool = True) -> tuple[int, int, bytes]:
    # thread id, exec time, db length, error code, status vars length; status; db; text
    return QUERY, 1, struct.pack("<IIBHH", 7, 0, 3, 0, 0) + b"app\0" + text + (
        b"crc!" if crc else b"")


def binlog(*events: tuple[int, int, bytes]) -> bytes:
    out, at = bytearray(b"\xfebin"), 4
    for kind, server, body in events:
        size = 19 + len(body)
        out += struct.pack("<IBIIIH", 1796659394, kind, server, size, at + size, 0) + body
        at += size
    return bytes(out)


def decoded(data: bytes) -> list[Event]:
    return EventReader().feed(data)


def offsets(data: bytes) -> list[int]:
    return [ev.start for ev in decoded(data)]


def test_parse_gtids_is_strict() -> None:
    assert parse_gtids("0-1-42,5-2-7") == {0: (1, 42), 5: (2, 7)}
    assert parse_gtids("") == {}
    assert gtid_text({5: (2, 7), 0: (1, 42)}) == "0-1-42,5-2-7"
    for bad in ("0-1", "0-1-2-3", "a-1-2", "0-1-2,0-1-3", "0-1-99999999999999999999",
                "99999999999-1-1", " 0-1-2\n", None, 7, "0-1-2;DROP", "0-1-2" + ",0-1-3" * 900):
        assert parse_gtids(bad) is None or bad == " 0-1-2\n", bad


def test_a_domain_beginning_and_a_sequence_going_back_are_changes() -> None:
    seen = GtidRange({0: (1, 10)})
    seen.add(decoded(binlog(gtid(0, 11), gtid(0, 12), gtid(5, 1), gtid(0, 12), gtid(0, 13))))
    assert seen.first == {0: (1, 11), 5: (1, 1)} and seen.last == {0: (1, 13), 5: (1, 1)}
    whats = [why for _, why in seen.changes]
    assert len(whats) == 2 and "domain 5 begins" in whats[0] and "went back" in whats[1]
    # an archive's first events: their file's GTID list says which domains came before
    listed = struct.pack("<IIIQIIQ", 2, 0, 1, 7, 3, 2, 4)
    fresh = GtidRange()
    fresh.add(decoded(binlog(event(GTID_LIST, listed), gtid(0, 8), gtid(3, 5), gtid(0, 9))))
    assert fresh.changes == [] and fresh.facts() == {"gtid_first": "0-1-8,3-1-5",
                                                     "gtid_last": "0-1-9,3-1-5"}
    unlisted = GtidRange()  # a new server's first file: its first GTID sets the domain
    unlisted.add(decoded(binlog(event(GTID_LIST, struct.pack("<I", 0)), gtid(0, 1),
                                gtid(3, 1))))
    assert [why[:20] for _, why in unlisted.changes] == ["GTID domain 3 begins"]


def test_a_manifests_gtid_claims_are_parsed_strictly() -> None:
    doc = {"kind": "binlogpart", "number": 1, "start": 0, "end": 100, "raw_bytes": 100,
           "identity": "1:binlog:1", "file_created": 1,
           "filename": archive_name("binlogpart", datetime.now(UTC),
                                    "00000001_00000000-00000064", codecs=["zstd"]).filename,
           "gtid_first": "0-1-5", "gtid_last": "0-1-9,junk",
           "gtid_changes": [{"at": "000001:50", "why": "GTID domain 5 begins"},
                            {"at": "000002:50", "why": "another file's"},
                            {"at": "000001:500", "why": "past its end"},
                            {"at": "000001:60", "why": "\x1b[31mescape"},
                            {"at": "000001:70", "why": "x" * 301}, "nonsense"]}
    p = piece(doc)
    assert p is not None, doc
    assert p.gtid_first == {0: (1, 5)} and p.gtid_last == {}
    assert p.gtid_changes == (((1 << 32) | 50, "GTID domain 5 begins"),)


def files(tmp_path: Path, *datas: bytes) -> list[Path]:
    out = []
    for i, data in enumerate(datas, 1):
        path = tmp_path / f"binlog.{i:06d}"
        path.write_bytes(data)
        out.append(path)
    return out


def test_where_a_gtids_transaction_ends(tmp_path: Path) -> None:
    rows = [event(TABLE_MAP, b"\0" * 12), event(ROWS, b"\0" * 12), event(XID, b"\0" * 12)]
    data = binlog(CRC_FDE, gtid(0, 1), *rows, gtid(0, 2, standalone=True),
                  query(b"CREATE TABLE x (i int)"), gtid(0, 3), query(b"BEGIN"),
                  query(b"INSERT INTO m VALUES (1)"), query(b"COMMIT"), gtid(0, 4), *rows)
    at = offsets(data)
    evs = decoded(data)
    [path] = files(tmp_path, data)
    assert gtid_stop([path], 4, (0, 1, 1)) == (0, evs[4].log_pos)  # after its XID
    assert gtid_stop([path], 4, (0, 1, 2)) == (0, evs[6].log_pos)  # DDL: its one statement
    assert gtid_stop([path], 4, (0, 1, 3)) == (0, evs[10].log_pos)  # MyISAM: its COMMIT
    assert gtid_stop([path], at[5], (0, 1, 1)) == \
        "no transaction with GTID 0-1-1 in the archived binlog (its domain went on to 0-1-2)"
    assert "went on" in str(gtid_stop([path], 4, (0, 2, 3)))  # another server's numbering
    assert "not in the archived binlog yet" in str(gtid_stop([path], 4, (0, 1, 9)))
    cut = files(tmp_path, data[:evs[13].start])  # its commit not shipped yet
    assert "commit of GTID 0-1-4 is not archived yet" in str(gtid_stop(cut, 4, (0, 1, 4)))
    # the last transaction archived (an idle server): its COMMIT ends it, checksum or not
    last = files(tmp_path, data[:evs[11].start])
    assert gtid_stop(last, 4, (0, 1, 3)) == (0, evs[10].log_pos)
    plain = binlog(event(FDE, b"\0" * 67 + b"\0crc!"), gtid(0, 3), query(b"BEGIN", crc=False),
                   query(b"COMMIT", crc=False))
    [path] = files(tmp_path, plain)
    assert gtid_stop([path], 4, (0, 1, 3)) == (0, len(plain))
    [path] = files(tmp_path, binlog(CRC_FDE, gtid(0, 3), query(b"COMMIT; DROP TABLE t")))
    assert "not archived yet" in str(gtid_stop([path], 4, (0, 1, 3)))  # not a COMMIT


def test_an_xa_prepare_group_ends_with_its_xa_prepare_event(tmp_path: Path) -> None:
    prepared = (GTID, 1, struct.pack("<QIB", 5, 0, 0x41) + b"\0" * 6)  # standalone + XA
    data = binlog(CRC_FDE, prepared, query(b"XA START X'01',X'',1"),
                  event(TABLE_MAP, b"\0" * 12), event(ROWS, b"\0" * 12),
                  query(b"XA END X'01',X'',1"), event(38, b"\0" * 12))
    [path] = files(tmp_path, data)
    assert gtid_stop([path], 4, (0, 1, 5)) == (0, len(data))


def test_a_gtid_in_a_later_file(tmp_path: Path) -> None:
    one = binlog(event(FDE, b"\0" * 20), gtid(0, 1), query(b"BEGIN"), event(XID, b"\0" * 8),
                 event(ROTATE, b"\0" * 8))
    two = binlog(event(FDE, b"\0" * 20), gtid(0, 2), event(XID, b"\0" * 8), gtid(0, 3))
    staged = files(tmp_path, one, two)
    assert gtid_stop(staged, 4, (0, 1, 2)) == (1, decoded(two)[2].log_pos)


@pytest.mark.parametrize("size", [5, 18, (1 << 30) + 1])
def test_hostile_bytes_are_refused_not_searched(tmp_path: Path, size: int) -> None:
    """An event whose header lies about its size stops the search (corrupt binlog)."""
    good = binlog(event(FDE, b"\0" * 20), gtid(0, 1))
    [path] = files(tmp_path, good + struct.pack("<IBIIIH", 0, XID, 1, size,
                                                len(good) + size, 0) + b"\0" * 40)
    with pytest.raises(PipelineError):
        gtid_stop([path], 4, (0, 1, 1))


def test_the_spool_scanner_reads_heads_only_and_waits_for_a_whole_event(
        tmp_path: Path) -> None:
    """EventScanner: events complete in a growing file, with their offsets, each keeping
    only its header (a GTID event whole), an event past the read block skipped over; an
    event still being written waits; the budget stops a scan."""
    from shared.formats.binlog import SCAN_BLOCK, EventScanner

    big = event(ROWS, b"r" * (3 * SCAN_BLOCK))
    data = binlog(event(FDE, b"\0" * 20), gtid(0, 1), big, event(XID, b"\0" * 8))
    path = tmp_path / "binlog.000001"
    scanner = EventScanner()
    path.write_bytes(data[:-5])  # the XID event half written
    with open(path, "rb") as f:
        got, more = scanner.scan(f, 1 << 20)
    assert [e.type for e in got] == [FDE, GTID, ROWS] and more
    assert [e.at for e in got] == offsets(data)[:3]
    assert len(got[2].data) == 19 and got[2].size == 19 + 3 * SCAN_BLOCK  # its header
    assert got[1].data == decoded(data)[1].data  # a GTID event whole (GtidRange reads it)
    path.write_bytes(data)
    with open(path, "rb") as f:
        got, more = scanner.scan(f, 1)  # one event's worth of budget at least
    assert [e.type for e in got] == [XID] and not more
    path.write_bytes(b"\x00bin" + data[4:])
    with open(path, "rb") as f, pytest.raises(PipelineError):
        EventScanner().scan(f, 1 << 20)
