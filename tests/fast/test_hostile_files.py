"""Every byte of a backup file is untrusted: hostile PostgreSQL scripts, decompression bombs
and lies in manifests, through uploads and through files placed in storage by hand."""

from __future__ import annotations

import pytest

from shared.formats.pgscript import PgScriptGuard, UnsafeScript
from tests.support.hostile import FOOTER, HEADER


def test_guard_passes_copy_data_that_looks_like_commands() -> None:
    """Inside COPY data, `\\!`-like rows and `\\.`-prefixed values are data, at any chunk
    boundary; the dump's own \\restrict lines are removed, line count kept."""
    data = (HEADER + b"COPY public.t (a) FROM stdin;\n\\\\! not a command\n\\restrict abc123\n"
            b"\\\\.x\n\\.\nSELECT 1;\n" + FOOTER)
    for size in (1, 2, 3, 5, 7, 64):
        guard = PgScriptGuard()
        out = b"".join(guard.feed(data[i:i + size]) for i in range(0, len(data), size))
        out += guard.finish()
        assert out.count(b"\n") == data.count(b"\n")
        assert b"\\restrict abc123\n\\\\.x" in out  # the data row is kept
        assert out.count(b"\\restrict") == 1 and b"\\unrestrict" not in out
        assert guard.footer


@pytest.mark.parametrize("script", [
    HEADER + b"COPY public.t (a) FROM stdin;\n1\n",  # cut inside COPY data
    HEADER + b"SELECT 'open string\n",
    HEADER + b"SELECT 1;\n",  # no footer
    HEADER + b"SELECT (1;\n-- PostgreSQL database dump complete\n",  # psql would wait for `)`
])
def test_guard_refuses_cut_off_scripts(script: bytes) -> None:
    """Incomplete scripts (or ones psql would keep reading past the footer) are refused."""
    guard = PgScriptGuard()
    guard.feed(script)
    with pytest.raises(UnsafeScript) as info:
        guard.finish()
    assert info.value.code == "invalid_upload"


@pytest.mark.parametrize("case", [
    b"CREATE FUNCTION f() RETURNS int LANGUAGE sql\n    BEGIN ATOMIC\n SELECT 1;\n"
    b" SELECT CASE WHEN true THEN 2 END;\nEND;\n",
    b"COPY public.t (" + b", ".join(b"col%d" % i for i in range(600)) + b") FROM stdin;\n1\n\\.\n",
    b"SELECT 1;\r\nCOPY t (a) FROM stdin;\r\n1\r\n\\.\r\nSELECT 2;\r\n",
    b"SELECT 'a'\n  'b';\n",
])
def test_guard_accepts_what_pg_dump_writes(case: bytes) -> None:
    """SQL-standard routine bodies, 600-column COPY lines, CRLF line ends, continued
    strings: accepted at every chunk size, line count kept."""
    script = HEADER + case + FOOTER
    for size in (1, 2, 3, 5, 64, len(script)):
        guard = PgScriptGuard()
        out = b"".join(guard.feed(script[i:i + size]) for i in range(0, len(script), size))
        out += guard.finish()
        assert out.count(b"\n") == script.count(b"\n")


def test_guard_stays_linear_on_many_small_copy_blocks() -> None:
    """Thousands of COPY blocks in one chunk: each is passed without copying the rest."""
    script = HEADER + b"COPY t FROM stdin;\n\\.\n" * 100_000 + FOOTER
    guard = PgScriptGuard()
    guard.feed(script)
    guard.finish()
    assert guard.line == script.count(b"\n")


