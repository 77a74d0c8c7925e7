"""The key filter of a Redis RESP backup (shared.formats.respkeys): only SELECT and the
RESTOREs whose key matches pass, byte for byte, however the stream is chunked; Redis's
glob; a stream cut inside a command, or lying in its headers, is refused."""

from __future__ import annotations

import pytest

from shared.errors import PipelineError
from shared.formats.resp import resp
from shared.formats.respkeys import KeyFilter, redis_glob

STREAM = (resp(b"SELECT", b"0")
          + resp(b"RESTORE", b"session:1", b"0", b"P" * 100_000, b"REPLACE")
          + resp(b"RESTORE", b"user:1", b"0", b"Q" * 10, b"REPLACE")
          + resp(b"SELECT", b"3")
          + resp(b"RESTORE", b"session:x", b"5", b"R", b"REPLACE", b"ABSTTL"))
KEPT = (resp(b"SELECT", b"0")
        + resp(b"RESTORE", b"session:1", b"0", b"P" * 100_000, b"REPLACE")
        + resp(b"SELECT", b"3")
        + resp(b"RESTORE", b"session:x", b"5", b"R", b"REPLACE", b"ABSTTL"))


@pytest.mark.parametrize("size", [1, 3, 7, 1000, 1 << 20])
def test_only_the_matching_keys_pass_whatever_the_chunks(size: int) -> None:
    f = KeyFilter(["session:*"])
    out = b"".join(f.feed(STREAM[i:i + size]) for i in range(0, len(STREAM), size))
    f.finish()
    assert out == KEPT and (f.kept, f.skipped) == (2, 1)


@pytest.mark.parametrize("pattern, yes, no", [
    (b"a?c", b"abc", b"abbc"), (b"[^x]y", b"ay", b"xy"), (b"h[a-c]llo", b"hbllo", b"hdllo"),
    (b"a\\*b", b"a*b", b"axb"), (b"s.*", b"s.*", b"sx"), (b"*", b"", None)])
def test_redis_glob(pattern: bytes, yes: bytes, no: bytes | None) -> None:
    rx = redis_glob(pattern)
    assert rx.match(yes)
    if no is not None:
        assert not rx.match(no)


@pytest.mark.parametrize("bad", [
    STREAM[:-3],  # cut inside a command
    b"*2\r\n$6\r\nSELECT\r\n$1\r\n0XX",  # a bulk string that does not end where it says
    b"PING\r\n",  # an inline command
    b"*1\r\n$" + b"9" * 40 + b"\r\n",  # a header line too long
])
def test_a_stream_that_lies_is_refused(bad: bytes) -> None:
    f = KeyFilter(["*"])
    with pytest.raises(PipelineError):
        f.feed(bad)
        f.finish()
