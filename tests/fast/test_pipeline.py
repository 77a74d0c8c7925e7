"""The byte pipeline: standard gzip out, streaming, honest errors on bad input."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from shared import codecs
from shared.codecs import GzipCompress
from shared.errors import PipelineError
from worker import pipeline


async def source(blocks: list[bytes], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, b in enumerate(blocks):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("source broke")
        yield b


class Collect:
    """A sink that keeps what it is given (the pipeline under test is the thing here)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.parts.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


async def chunks_of(data: bytes, size: int = 300_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def read_all(data: bytes, chain: list[dict[str, object]] | None = None) -> bytes:
    chain = [{"codec": "gzip"}] if chain is None else chain
    return b"".join([c async for c in pipeline.stored_plain(chunks_of(data), chain)])


async def test_store_then_read_round_trip() -> None:
    """Stored bytes are standard gzip with the reported sha256; reading gives the input."""
    blocks = [os.urandom(100_000) + b"text " * 50_000 for _ in range(12)]
    sink = Collect()
    seen: list[int] = []
    out = await pipeline.store(source(blocks), sink, [GzipCompress(2)], on_bytes=seen.append)
    assert hashlib.sha256(sink.data).hexdigest() == out["sha256"]
    assert gzip.decompress(sink.data) == b"".join(blocks)
    assert sum(seen) == out["raw_bytes"] == sum(map(len, blocks))
    assert out["size_bytes"] == len(sink.data)
    assert await read_all(sink.data) == b"".join(blocks)


async def test_source_error_propagates() -> None:
    """A failing source fails the store (the caller then aborts what it wrote)."""
    with pytest.raises(RuntimeError, match="source broke"):
        await pipeline.store(source([b"a" * 10, b"b"], fail_after=1), Collect(),
                             [GzipCompress(2)], on_bytes=lambda n: None)


async def test_multi_member_gzip_is_read_whole() -> None:
    """`cat a.gz b.gz` style files decompress to both members."""
    assert await read_all(gzip.compress(b"first\n") + gzip.compress(b"second\n")) == \
        b"first\nsecond\n"


async def test_truncated_gzip_is_an_error() -> None:
    """A cut-off gzip file raises instead of yielding a silently short dump."""
    with pytest.raises(PipelineError, match="truncated"):
        await read_all(gzip.compress(os.urandom(200_000))[:-100])


async def test_not_gzip_is_an_error() -> None:
    """Plain bytes where gzip is expected raise a clear error."""
    with pytest.raises(PipelineError, match="not valid gzip"):
        await read_all(b"CREATE TABLE t (x int);\n")


@pytest.mark.parametrize("chain", [[{"codec": "gzip"}], [{"codec": "zstd"}]])
async def test_decompression_output_is_bounded(chain: list[dict[str, object]]) -> None:
    """A tiny file of a huge run of zeros comes out in chunks of at most 1 MiB."""
    blob = Collect()
    await pipeline.store(source([b"\0" * (1 << 20)] * 64), blob,
                         codecs.encoders([{**chain[0], "level": 9}]), on_bytes=lambda n: None)
    assert len(blob.data) < 1 << 20
    sizes = [len(c) async for c in pipeline.stored_plain(chunks_of(blob.data), chain)]
    assert sum(sizes) == 64 << 20
    assert max(sizes) <= codecs.CHUNK


def test_resp_reader_streams_at_any_chunk_size_and_keeps_no_large_argument() -> None:
    from shared.formats.resp import RespReader, resp

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
    from shared.formats.resp import RespReader

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

    from shared.formats.tarstream import TarReader

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
    from shared.formats.tarstream import TarReader

    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 256 << 20
    for bad in (info.tobuf(format=tarfile.USTAR_FORMAT), b"x" * 512):
        reader = TarReader()
        reader.push(bad)
        with pytest.raises(PipelineError):
            reader.next_event()


CHAINS = [[{"codec": "gzip"}], [{"codec": "zstd", "level": 3}],
          [{"codec": "zstd", "level": 3, "threads": 1}],
          [{"codec": "zstd", "level": 3}, {"codec": "age"}], [{"codec": "age"}]]


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "+".join(s["codec"] for s in c))
async def test_codec_chains_round_trip_and_refuse_cut_or_padded_files(
        chain: list[dict[str, object]]) -> None:
    """Every chain gives back its input; a file cut anywhere, or with bytes after its end,
    is an error — never a silently short dump (zstandard alone ends quietly at a cut)."""
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    steps = [{**s, "recipient_keys": [str(ident.to_public())]} if s["codec"] == "age" else s
             for s in chain]
    data = (os.urandom(200_000) + b"INSERT INTO t VALUES (1, 'x');\n" * 40_000) * 3
    blob = Collect()
    await pipeline.store(chunks_of(data, 100_000), blob, codecs.encoders(steps),
                         on_bytes=lambda n: None)

    async def decode(stored: bytes) -> bytes:
        return b"".join([c async for c in pipeline.stored_plain(
            chunks_of(stored), chain, identities=[ident])])

    assert await decode(blob.data) == data
    for cut in (len(blob.data) // 3, len(blob.data) - 5):
        with pytest.raises(PipelineError):
            await decode(blob.data[:cut])
    with pytest.raises(PipelineError):
        await decode(blob.data + b"\x28\xb5\x2f\xfdjunk")


def test_zstd_frame_walk_is_linear_on_hostile_block_runs() -> None:
    """A stream of a million 1-byte RLE blocks is walked without copying per block (the
    suite's per-test timeout is the bound: a copy per block would take hours)."""
    frames = codecs.ZstdFrames()
    header = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x50])  # magic, FHD (no checksum), window
    rle = (0b010 | (1 << 3)).to_bytes(3, "little") + b"x"  # RLE block of 1 byte, not last
    frames.feed(header)
    for _ in range(4):
        frames.feed(rle * 250_000)
    frames.feed((0b011 | (1 << 3)).to_bytes(3, "little") + b"x")  # last block
    assert frames.at_frame_end()
