"""Issue 21: server targets — `databases = "*"` (or a list, less `exclude`) backs up every
database of a PostgreSQL or MySQL/MariaDB server as one backup set: listed as one backup
with its members, picked up as databases appear, restored whole or one member (the others
untouched), drilled member by member, restored onto a new server; the set's file is
untrusted input like any backup."""

from __future__ import annotations

import pytest

from shared import backup_sets
from shared.errors import PipelineError

# ------------------------------------------------------------------ the file is untrusted
TOKEN = "00112233445566778899aabbccddeeff"


def a_set(*members: tuple[str, bytes], tail: bytes = b"") -> bytes:
    out = backup_sets.header(TOKEN, "postgresql", [m for m, _ in members])
    for name, body in members:
        out += backup_sets.member_line(TOKEN, name) + body
    return out + backup_sets.end_line(TOKEN) + tail


def split(blob: bytes, step: int = 7) -> list[tuple[str, bytes]]:
    parts = [blob[i:i + step] for i in range(0, len(blob), step)]
    return [(n, b"".join(it)) for n, it in backup_sets.iter_members(iter(parts), TOKEN)]


def test_members_come_back_exactly_whatever_the_chunking() -> None:
    members = [("a", b"COPY t FROM stdin;\n-- Safehold set 0000000000000000 member \"x\"\n"
                     b"\\.\n"), ("we\"ird\nname", b"x\n"), ("empty", b"")]
    blob = a_set(*members)
    for step in (1, 2, 5, 64, 4096):
        assert split(blob, step) == members


@pytest.mark.parametrize("blob, why", [
    (a_set(("a", b"x\n"))[:-5], "cut off"),
    (a_set(("a", b"x\n"), tail=b"DROP DATABASE a;\n"), "after its end marker"),
    (b"SELECT 1;\n" + a_set(("a", b"x\n")), "before its first member"),
    (a_set(("a", b"x\n"), ("a", b"y\n")), "twice"),
    (a_set(("a", b"x\n")).replace(b'member "a"', b"member a"), "not JSON"),
    (a_set(("a", b"x\n")).replace(b'member "a"', b'member ""'), "without a database name"),
    (a_set(("a", b"x\n")) + backup_sets.member_line(TOKEN, "b"), "after its end marker"),
])
def test_a_lying_set_is_refused(blob: bytes, why: str) -> None:
    with pytest.raises(PipelineError) as err:
        split(blob)
    assert why in err.value.message and err.value.code == "corrupt_backup"


