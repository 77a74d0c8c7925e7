"""Hypothesis properties of the hand-written parsers and grammars (no servers):
the naming grammar, the Cypher statement splitter, the RESP reader and writer, the tar
reader, and the gzip / zstd / age codec chain."""

from __future__ import annotations

import asyncio
import io
import random
import tarfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pyrage
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared import codecs, naming
from shared.errors import InvalidBackupName, PipelineError, SafeholdError
from shared.formats.cypher import StatementSplitter, split_statements
from shared.formats.redis import RedisScriptCheck
from shared.formats.resp import RespReader, resp
from shared.formats.tarstream import TarReader
from tests.fast.test_pipeline import Collect, chunks_of
from worker import pipeline

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def cuts(data: bytes | str, seed: int, pieces: int) -> list[bytes | str]:
    """`data` cut at `pieces` random places (empty pieces included)."""
    rng = random.Random(seed)
    at = sorted(rng.randrange(len(data) + 1) for _ in range(pieces))
    bounds = [0, *at, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# ---------------------------------------------------------------------- naming
names = st.builds(
    naming.BackupName,
    kind=st.sampled_from(naming.KINDS),
    engine=st.sampled_from(sorted(naming.ENGINE_EXTENSIONS)),
    created_at=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1))
    .map(lambda d: d.replace(microsecond=0, tzinfo=UTC)),
    seq=st.integers(1, 9999),
    ext=st.sampled_from(["sql", "db", "tar", "resp", "rdb", "cypher", "dump"]),
    suffix=st.sampled_from(["", ".gz", ".zst", ".age", ".gz.age", ".zst.age"]))


@FAST
@given(names)
def test_parse_after_format_is_the_identity(name: naming.BackupName) -> None:
    assert naming.parse(name.filename) == name


@FAST
@given(st.text(min_size=0, max_size=160))
def test_nothing_that_parses_can_leave_its_directory(text: str) -> None:
    try:
        name = naming.parse(text)
    except InvalidBackupName:
        return
    assert name.filename == text  # the only accepted spelling is the canonical one
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz0123456789_.")
    assert "/" not in text and ".." not in text and not text.startswith(".")


@FAST
@given(names, st.sampled_from(["/", "\\", "..", "\x00", " ", "%2e", "\n", "A"]),
       st.integers(0, 200))
def test_a_valid_name_with_anything_inserted_is_refused(name: naming.BackupName, bad: str,
                                                        at: int) -> None:
    text = name.filename
    at %= len(text) + 1
    with pytest.raises(InvalidBackupName):
        naming.parse(text[:at] + bad + text[at:])


# ---------------------------------------------------------------------- Cypher splitter
cypher_pieces = st.lists(st.sampled_from([
    "CREATE (n:A {s: 'a;b'})", "MATCH (n) RETURN n", "`we;ird`", '"dq;\\";"', "'it\\'s;'",
    "// a comment; here\n", "/* block; */", ";", ";\n", "\n", " ", ":begin\n", ":commit\n",
    "UNWIND [1,2] AS x CREATE (:B {x: x})", "// safehold:fix-bytes\n",
]), max_size=25)


@FAST
@given(cypher_pieces, st.integers(0, 2**32), st.integers(0, 30))
def test_any_chunking_of_a_script_gives_the_same_statements(pieces: list[str], seed: int,
                                                            n: int) -> None:
    script = "".join(pieces)
    whole = split_statements(script)
    splitter = StatementSplitter()
    got: list[str] = []
    for chunk in cuts(script, seed, n):
        got += splitter.feed(str(chunk))
    got += splitter.feed("", final=True)
    assert got == whole


# ---------------------------------------------------------------------- RESP
commands = st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=6), max_size=12)


@FAST
@given(commands, st.integers(0, 2**32), st.integers(0, 40))
def test_resp_round_trips_arbitrary_bytes_under_any_chunking(
        cmds: list[list[bytes]], seed: int, n: int) -> None:
    stream = b"".join(resp(*c) for c in cmds)
    reader = RespReader(keep=1 << 20)
    got: list[list[bytes | None]] = []
    for chunk in cuts(stream, seed, n):
        got += reader.feed(bytes(chunk))
    reader.finish()
    assert got == cmds


@FAST
@given(commands, st.integers(0, 2**32), st.integers(0, 40), st.integers(0, 400))
def test_resp_hands_long_commands_to_the_streaming_parser_and_back(
        cmds: list[list[bytes]], seed: int, n: int, threshold: int) -> None:
    """The C parser hands a command whose bytes pile up past the threshold to the streaming
    parser (which never holds a long argument), then takes over again: same commands."""
    stream = b"".join(resp(*c) for c in cmds)
    reader = RespReader(keep=1 << 20, fast_max_pending=threshold)
    got: list[list[bytes | None]] = []
    for chunk in cuts(stream, seed, n):
        got += reader.feed(bytes(chunk))
    reader.finish()
    assert got == cmds


def _outcome(reader: RespReader, chunks: list[bytes]) -> object:
    got: list[list[bytes | None]] = []
    try:
        for chunk in chunks:
            got += reader.feed(chunk)
        reader.finish()
    except PipelineError:
        return ("refused", got)
    return ("read", got)


# RESP3 and inline framings hiredis reads into the same Python values as a RESP2 array of
# bulks, while Redis would run the bytes as inline commands, line by line
RESP3_SMUGGLING = {
    "set": b"~5\r\n$7\r\nRESTORE\r\n$1\r\nk\r\n$1\r\n0\r\n$33\r\n\r\nFLUSHALL\r\n"
           b"CONFIG SET dir /tmp\r\n\r\n$7\r\nREPLACE\r\n",
    "attribute": b"|1\r\n$1\r\na\r\n$1\r\nb\r\n",
    "push": b">1\r\n$8\r\nFLUSHALL\r\n",
    "false": b"#f\r\n",
    "verbatim element": b"*2\r\n$6\r\nSELECT\r\n=5\r\nA\r\n:0\r\n",
    "simple-string element": b"*2\r\n$6\r\nSELECT\r\n+0\r\n",
    "integer element": b"*2\r\n$6\r\nSELECT\r\n:0\r\n",
    "double": b",1.5\r\n",
    "map": b"%1\r\n$1\r\na\r\n$1\r\nb\r\n",
    "inline": b"FLUSHALL\r\n",
}


@pytest.mark.parametrize("name", sorted(RESP3_SMUGGLING))
@pytest.mark.parametrize("fast", [True, False])
def test_resp3_and_inline_framings_are_refused(name: str, fast: bool) -> None:
    """Found by review: a RESP3 set (`~5`) whose bulk held `\r\nFLUSHALL\r\n…` passed
    the C parser's check while Redis would have run FLUSHALL and CONFIG SET inline."""
    stream = resp(b"SELECT", b"0") + RESP3_SMUGGLING[name] + resp(b"SELECT", b"0")
    check = RedisScriptCheck()
    check.reader = RespReader(max_parts=6, fast=fast)
    with pytest.raises(SafeholdError):
        check.feed(stream)
        check.finish()


@FAST
@given(commands, st.one_of(st.binary(max_size=40), st.sampled_from(
           sorted(RESP3_SMUGGLING.values()))), st.integers(0, 2**32), st.integers(0, 12),
       st.integers(0, 2**16), st.integers(0, 300))
def test_resp_fast_and_streaming_parsers_agree_on_hostile_bytes(
        cmds: list[list[bytes]], junk: bytes, seed: int, n: int, at: int,
        threshold: int) -> None:
    """Valid commands with bytes spliced in anywhere (a lie in a length, a stray CRLF, an
    integer or error reply, nesting…): the C parser refuses exactly what the streaming
    parser refuses, after the same commands."""
    stream = b"".join(resp(*c) for c in cmds)
    at %= len(stream) + 1
    hostile = stream[:at] + junk + stream[at:]
    chunks = [bytes(c) for c in cuts(hostile, seed, n)]
    slow = _outcome(RespReader(keep=64, fast=False), chunks)
    quick = _outcome(RespReader(keep=64, fast_max_pending=threshold), chunks)
    assert quick[0] == slow[0]
    if slow[0] == "read":
        assert quick == slow


@FAST
@given(commands.filter(bool), st.integers(1, 200))
def test_a_resp_stream_cut_inside_a_command_is_refused(cmds: list[list[bytes]],
                                                       cut: int) -> None:
    """(A cut between two commands leaves a shorter valid stream: RESP has no end mark,
    so that one is caught by the manifest's sha256, not here.)"""
    encoded = [resp(*c) for c in cmds]
    stream = b"".join(encoded)
    boundaries = {sum(len(e) for e in encoded[:i]) for i in range(len(encoded) + 1)}
    cut = cut % len(stream)
    assume(cut not in boundaries)
    reader = RespReader(keep=1 << 20)
    with pytest.raises(PipelineError):
        reader.feed(stream[:cut])
        reader.finish()


# ---------------------------------------------------------------------- tar
members = st.lists(st.tuples(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"),
            min_size=1, max_size=150),
    st.binary(max_size=3000)), max_size=6, unique_by=lambda m: m[0])


@FAST
@given(members, st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
       st.integers(0, 2**32), st.integers(0, 30))
def test_tar_reader_agrees_with_tarfile(files: list[tuple[str, bytes]], fmt: int, seed: int,
                                        n: int) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files:
            info = tarfile.TarInfo(f"dump/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reader = TarReader()
    got: dict[str, bytearray] = {}
    current = None
    done = False
    for chunk in cuts(buf.getvalue(), seed, n):
        reader.push(bytes(chunk))
        while (ev := reader.next_event()) is not None:
            kind, value = ev
            if kind == "file":
                current = value[0]  # type: ignore[index]
                got[current] = bytearray()
            elif kind == "data":
                got[current] += value  # type: ignore[index, operator]
            elif kind == "eof":
                done = True
    assert done
    assert {k: bytes(v) for k, v in got.items()} == {f"dump/{k}": v for k, v in files}


# ---------------------------------------------------------------------- codec chain
IDENTITY = pyrage.x25519.Identity.generate()
RECIPIENT = str(IDENTITY.to_public())
CHAINS = {
    "gzip": [{"codec": "gzip", "level": 1}],
    "zstd": [{"codec": "zstd", "level": 1, "threads": 0}],
    "gzip+age": [{"codec": "gzip", "level": 1}, {"codec": "age", "recipient_keys": [RECIPIENT]}],
    "zstd+age": [{"codec": "zstd", "level": 1, "threads": 0},
                 {"codec": "age", "recipient_keys": [RECIPIENT]}],
}


async def encode(chain: list[dict[str, object]], plain: bytes, size: int) -> bytes:
    sink = Collect()
    await pipeline.store(chunks_of(plain, size), sink, codecs.encoders(chain),
                         on_bytes=lambda n: None)
    return sink.data


async def decode(chain: list[dict[str, object]], stored: bytes, size: int) -> bytes:
    return b"".join([c async for c in pipeline.stored_plain(
        chunks_of(stored, size), chain, identities=[IDENTITY])])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CHAINS)), st.binary(max_size=20_000), st.integers(1, 5000),
       st.integers(0, 10**9))
def test_codec_chains_round_trip_and_always_detect_a_cut(
        chain_name: str, plain: bytes, size: int, cut_at: int) -> None:
    chain = CHAINS[chain_name]

    async def check() -> None:
        stored = await encode(chain, plain, size)
        assert await decode(chain, stored, size) == plain
        with pytest.raises(PipelineError):  # age output varies: the cut is relative
            await decode(chain, stored[:cut_at % len(stored)], size)
    asyncio.run(check())


def test_names_carry_utc_whatever_the_zone_of_the_time_given() -> None:
    local = datetime(2026, 3, 29, 4, 30, tzinfo=timezone(timedelta(hours=2)))
    assert naming.new_name("backup", "postgresql", local).filename == \
        "backup_postgresql_20260329_023000.sql.gz"


def test_a_final_newline_is_not_part_of_any_grammar() -> None:
    """Found by the insertion property: Python's `$` also matches before a final newline,
    so `…sql.gz\\n` parsed. Every grammar anchors with `\\Z`."""
    from shared.config import TARGET_ID_RE
    from shared.retention import _AGE

    with pytest.raises(InvalidBackupName):
        naming.parse("backup_postgresql_20241110_120000.sql.gz\n")
    assert TARGET_ID_RE.match("main\n") is None and _AGE.match("30d\n") is None


# ------------------------------------------------------- the load is what was checked
@FAST
@given(st.binary(max_size=700), st.integers(0, 2**32), st.integers(0, 9),
       st.integers(1, 97))
def test_window_digests_do_not_depend_on_how_the_stream_is_cut(
        data: bytes, seed: int, n: int, window: int) -> None:
    whole, cut = codecs.WindowDigests(window), codecs.WindowDigests(window)
    whole.feed(data)
    for piece in cuts(data, seed, n):
        cut.feed(bytes(piece))
    digests = whole.finish()
    assert cut.finish() == digests and len(digests) == 32 * -(-len(data) // window)


async def _load(loaded: bytes, checked: bytes, window: int, seed: int, n: int
                ) -> tuple[bytes, str | None]:
    windows = codecs.WindowDigests(window)
    windows.feed(checked)

    async def source() -> AsyncIterator[bytes]:
        for piece in cuts(loaded, seed, n):
            yield bytes(piece)

    passed, error = b"", None
    try:
        async for chunk in pipeline.SameAsChecked(source(), windows.finish(), window):
            passed += chunk
    except PipelineError as exc:
        error = exc.code
    return passed, error


@FAST
@given(st.binary(min_size=1, max_size=500), st.integers(0, 2**32), st.integers(0, 9),
       st.integers(1, 64), st.integers(0, 2**16), st.sampled_from(["flip", "cut", "grow"]))
def test_a_load_passes_only_what_was_checked(data: bytes, seed: int, n: int, window: int,
                                             at: int, change: str) -> None:
    """The same bytes, however cut, pass whole; a backup changed between the check and
    the load (a byte flipped, cut short, grown) fails, and no byte from the first changed
    window on is passed."""
    assert asyncio.run(_load(data, data, window, seed, n)) == (data, None)
    at %= len(data)
    changed = {"flip": data[:at] + bytes([data[at] ^ 1]) + data[at + 1:],
               "cut": data[:at], "grow": data + b"\x00"}[change]
    passed, error = asyncio.run(_load(changed, data, window, seed, n))
    assert error == "checksum_mismatch"
    first_changed = at if change != "grow" else len(data)
    assert len(passed) <= first_changed - first_changed % window
    assert data.startswith(passed)
