"""A staged binlog file must be what the archive's manifests claimed (issue 26): events
end to end from the magic, and a file the replay goes past ends with its rotate event —
a manifest claiming a file complete that is not, or bytes that do not chain, stop the
restore before anything changed."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from shared.errors import RestoreFailed
from worker.procedures.pitr_mysql import _check_staged


def events(*kinds: int) -> bytes:
    out, at = bytearray(b"\xfebin"), 4
    for kind in kinds:
        body = b"\x00" * 20
        size = 19 + len(body)
        out += struct.pack("<IBIIIH", 1796659394, kind, 1, size, at + size, 0) + body
        at += size
    return bytes(out)


def staged(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "binlog.000001"
    path.write_bytes(data)
    return path


def test_a_whole_file_passes(tmp_path: Path) -> None:
    _check_staged(staged(tmp_path, events(15, 162, 2, 4)), last=False, joined=False)
    _check_staged(staged(tmp_path, events(15, 162, 2)), last=True, joined=False)
    _check_staged(staged(tmp_path, events(15, 162, 2)), last=False, joined=True)


@pytest.mark.parametrize(("data", "last"), [
    (events(15, 162, 2), False),  # "complete", but no rotate: the rest of it is missing
    (events(15, 162, 2, 4)[:-5], True),  # cut inside an event
    (events(15, 162) + events(2)[4:], True),  # an event whose position does not chain
    (b"\x00bin" + events(15)[4:], True),  # no magic
])
def test_a_staged_file_that_lies_stops_the_restore(tmp_path: Path, data: bytes,
                                                    last: bool) -> None:
    with pytest.raises(RestoreFailed) as caught:
        _check_staged(staged(tmp_path, data), last=last, joined=False)
    assert caught.value.code == "archive_damaged"
