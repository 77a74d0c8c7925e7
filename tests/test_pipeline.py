"""The byte pipeline: standard gzip out, streaming, honest errors on bad input."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.errors import PipelineError
from shared.storage import LocalStorage
from worker import pipeline


async def source(blocks: list[bytes], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, b in enumerate(blocks):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("source broke")
        yield b


async def test_store_then_read_round_trip(tmp_path: Path) -> None:
    """Stored bytes are standard gzip with the reported sha256; reading gives the input."""
    blocks = [os.urandom(100_000) + b"text " * 50_000 for _ in range(12)]
    storage = LocalStorage(tmp_path)
    temp = storage.create_temp("t", "j")
    seen: list[int] = []
    out = await pipeline.store(source(blocks), temp, compress=True, level=2,
                               on_bytes=seen.append)
    temp.finish()
    stored = temp.path.read_bytes()
    assert hashlib.sha256(stored).hexdigest() == out["sha256"]
    assert gzip.decompress(stored) == b"".join(blocks)
    assert sum(seen) == out["raw_bytes"] == sum(map(len, blocks))
    back = b"".join([c async for c in pipeline.read_stored(temp.path, decompress=True)])
    assert back == b"".join(blocks)


async def test_source_error_propagates(tmp_path: Path) -> None:
    """A failing source fails the store (the caller then discards the temp file)."""
    temp = LocalStorage(tmp_path).create_temp("t", "j")
    with pytest.raises(RuntimeError, match="source broke"):
        await pipeline.store(source([b"a" * 10, b"b"], fail_after=1), temp, compress=True,
                             level=2, on_bytes=lambda n: None)
    temp.discard()
    assert not temp.path.exists()


async def read_all(path: Path) -> bytes:
    return b"".join([c async for c in pipeline.read_stored(path, decompress=True)])


async def test_multi_member_gzip_is_read_whole(tmp_path: Path) -> None:
    """`cat a.gz b.gz` style files decompress to both members."""
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"first\n") + gzip.compress(b"second\n"))
    assert await read_all(p) == b"first\nsecond\n"


async def test_truncated_gzip_is_an_error(tmp_path: Path) -> None:
    """A cut-off gzip file raises instead of yielding a silently short dump."""
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(os.urandom(200_000))[:-100])
    with pytest.raises(PipelineError, match="truncated"):
        await read_all(p)


async def test_not_gzip_is_an_error(tmp_path: Path) -> None:
    """Plain bytes where gzip is expected raise a clear error."""
    p = tmp_path / "x.gz"
    p.write_bytes(b"CREATE TABLE t (x int);\n")
    with pytest.raises(PipelineError, match="not valid gzip"):
        await read_all(p)


async def test_decompression_output_is_bounded(tmp_path: Path) -> None:
    """A tiny gzip of a huge run of zeros comes out in chunks of at most 1 MiB."""
    p = tmp_path / "zeros.gz"
    p.write_bytes(gzip.compress(b"\0" * (64 << 20), compresslevel=9))
    sizes = [len(c) async for c in pipeline.read_stored(p, decompress=True)]
    assert sum(sizes) == 64 << 20
    assert max(sizes) <= pipeline.CHUNK


def test_resp_reader_streams_at_any_chunk_size_and_keeps_no_large_argument() -> None:
    from shared.resp import RespReader, resp

    big = b"x" * 100_000
    stream = resp(b"SELECT", b"3") + resp(b"RESTORE", b"k", b"0", big, b"REPLACE")
    for size in (1, 2, 3, 7, 1000, len(stream)):
        reader = RespReader(keep=256)
        cmds = [c for i in range(0, len(stream), size)
                for c in reader.feed(stream[i:i + size])]
        reader.finish()
        assert cmds == [[b"SELECT", b"3"], [b"RESTORE", b"k", b"0", None, b"REPLACE"]]


@pytest.mark.parametrize("bad", [b"*99999999\r\n", b"+OK\r\n", b"*1\r\n$5\r\nabcdefg\r\n",
                                 b"*1\r\n$600000000\r\n", b"*1\r\n" + b"$" * 100])
def test_resp_reader_refuses_lies_in_headers(bad: bytes) -> None:
    from shared.errors import PipelineError
    from shared.resp import RespReader

    with pytest.raises(PipelineError):
        reader = RespReader(max_parts=6)
        reader.feed(bad)
        reader.finish()


def _tar(members: dict[str, bytes], fmt: int) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_tar_reader_at_any_chunk_size(fmt: str) -> None:
    import tarfile

    from shared.tarstream import TarReader

    long = "db/" + "c" * 150 + ".bson"
    members = {"prelude.json": b"{}", "db/x.bson": b"\x05\x00\x00\x00\x00" * 300,
               "db/empty.bson": b""}
    if fmt != "ustar":
        members[long] = b"abc"
    blob = _tar(members, {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT,
                          "ustar": tarfile.USTAR_FORMAT}[fmt])
    for size in (1, 7, 512, 1000, len(blob)):
        reader, got, current = TarReader(), {}, ""
        chunks = iter([blob[i:i + size] for i in range(0, len(blob), size)])
        while True:
            event = reader.next_event()
            if event is None:
                reader.push(next(chunks))
                continue
            kind, payload = event
            if kind == "eof":
                break
            if kind == "file":
                current = payload[0]
                got[current] = b""
            elif kind == "data":
                got[current] += payload
        assert got == members


def test_tar_reader_refuses_huge_or_broken_headers() -> None:
    import tarfile

    from shared.errors import PipelineError
    from shared.tarstream import TarReader

    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 256 << 20
    for bad in (info.tobuf(format=tarfile.USTAR_FORMAT), b"x" * 512):
        reader = TarReader()
        reader.push(bad)
        with pytest.raises(PipelineError):
            reader.next_event()
