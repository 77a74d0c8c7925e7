"""The codec chain: how a dump's bytes become a stored file and back.

A chain is a list of steps recorded in the manifest, outermost last, e.g.
`[{"codec": "zstd", "level": 3}, {"codec": "age", "recipients": ["sha256:…"]}]` for a
`.sql.zst.age` file: dump → zstd → age → stored. Two registries (httpx's
`SUPPORTED_DECODERS` + `MultiDecoder` pattern):

* ENCODERS: push stages (`feed(bytes) -> bytes`, `flush() -> bytes`) used by the backup
  pipeline, in chain order.
* DECODERS: pull readers wrapping a readable (`read(n) -> bytes`, at most n bytes), stacked in
  reverse chain order. Every decoder bounds its output per call, so a 1 MiB block that
  inflates to gigabytes never sits in memory, and rejects truncated input.

`PlainReader` is the one decoding loop: hashes the stored bytes, decodes the chain, bounds the
inflation and verifies the sha256 before reporting the end. Old manifests
(`"compression": {"algorithm": "gzip"}`) map to a `gzip` chain.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from shared.errors import IntegrityError, PipelineError, Unprocessable

CHUNK = 1 << 20
READ_BLOCK = 256 * 1024  # compressed input per read: bounds the output of one pull
GZIP_WBITS = 31  # gzip container
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
AGE_MAGIC = b"age-encryption.org/v1\n"

Step = Mapping[str, Any]


class Stage(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def _corrupt(what: str) -> PipelineError:
    return PipelineError(what, code="corrupt_backup")


# ---------------------------------------------------------------------------- gzip
_gz: types.ModuleType
try:
    from isal import isal_zlib

    _gz, GZIP_IMPL, MAX_LEVEL = isal_zlib, "isal", 3
    _GZ_ERRORS: tuple[type[Exception], ...] = (zlib.error, isal_zlib.error)  # type: ignore[assignment]
except ImportError:  # pragma: no cover - isal has wheels for our platforms
    _gz, GZIP_IMPL, MAX_LEVEL = zlib, "zlib", 9
    _GZ_ERRORS = (zlib.error,)


class GzipCompress:
    def __init__(self, level: int = 1) -> None:
        self._c = _gz.compressobj(min(level, MAX_LEVEL), zlib.DEFLATED, GZIP_WBITS)

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class GzipDecompress:
    """Decompresses gzip, including multi-member files (`cat a.gz b.gz`); rejects truncation.

    `push` + `pull(max_out)` bound the output per call."""

    def __init__(self) -> None:
        self._d = _gz.decompressobj(GZIP_WBITS)
        self._in_member = False
        self._pending = b""
        self._seen = False  # any input at all: an empty file is no gzip stream

    def push(self, data: bytes) -> None:
        self._seen = self._seen or bool(data)
        self._pending = self._pending + data if self._pending else data

    def pull(self, max_out: int) -> bytes:
        """Up to `max_out` bytes of output; b"" when the pushed input is used up."""
        while self._pending:
            self._in_member = True
            try:
                out = self._d.decompress(self._pending, max_out)
            except _GZ_ERRORS as exc:
                raise _corrupt(f"the backup is not valid gzip: {exc}") from None
            if self._d.eof:
                self._in_member = False
                self._pending = self._d.unused_data
                self._d = _gz.decompressobj(GZIP_WBITS)
            else:
                self._pending = self._d.unconsumed_tail
            if out:
                return out
        return b""

    def flush(self) -> bytes:
        if self._in_member:
            raise _corrupt("the backup's gzip stream is truncated")
        if not self._seen:
            raise _corrupt("the backup is empty: not even a gzip header")
        return b""


class GzipReader:
    def __init__(self, src: Readable, step: Step, identities: Sequence[Any]) -> None:
        self._src = src
        self._d = GzipDecompress()

    def read(self, n: int) -> bytes:
        while True:
            if out := self._d.pull(n):
                return out
            block = self._src.read(READ_BLOCK)
            if not block:
                self._d.flush()
                return b""
            self._d.push(block)


# ---------------------------------------------------------------------------- zstd
class ZstdCompress:
    def __init__(self, level: int = 3, threads: int = 0) -> None:
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, write_checksum=True)
        self._c = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class ZstdFrames:
    """Follows the zstd frame structure of the compressed bytes (frame header, block
    headers, checksum; skippable frames) so that a stream cut mid-frame is detected:
    `zstandard`'s stream reader ends silently at a truncation. Walks each fed block with an
    offset (hostile files of tiny blocks cost no copying) and keeps only an incomplete
    header between feeds."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._skip = 0  # bytes to pass over (block bodies, checksums, skippable frames)
        self._state = "magic"
        self._checksum = False

    def feed(self, data: bytes) -> None:
        self._buf = self._buf[self._pos:] + data if self._pos < len(self._buf) else data
        self._pos = 0
        while True:
            if self._skip:
                used = min(self._skip, len(self._buf) - self._pos)
                self._skip -= used
                self._pos += used
                if self._skip:
                    break
            if not self._step():
                break
        self._buf = self._buf[self._pos:]
        self._pos = 0

    def _step(self) -> bool:
        b, p = self._buf, self._pos
        left = len(b) - p
        if self._state == "magic":
            if left < 4:
                return False
            magic = int.from_bytes(b[p:p + 4], "little")
            if magic == 0xFD2FB528:
                self._state = "header"
                self._pos += 4
                return True
            if magic & 0xFFFFFFF0 == 0x184D2A50:
                if left < 8:
                    return False
                self._skip = int.from_bytes(b[p + 4:p + 8], "little")
                self._pos += 8
                return True
            raise _corrupt("the backup is not valid zstd (bad frame magic)")
        if self._state == "header":
            if not left:
                return False
            fhd = b[p]
            fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            self._checksum = bool((fhd >> 2) & 1)
            size = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + \
                (1 if single and fcs_flag == 0 else (0, 2, 4, 8)[fcs_flag])
            if left < size:
                return False
            self._pos += size
            self._state = "block"
            return True
        if left < 3:  # a block header
            return False
        header = int.from_bytes(b[p:p + 3], "little")
        last, btype, bsize = header & 1, (header >> 1) & 3, header >> 3
        if btype == 3:
            raise _corrupt("the backup is not valid zstd (reserved block type)")
        self._pos += 3
        self._skip = 1 if btype == 1 else bsize
        if last:
            self._state = "magic"
            self._skip += 4 if self._checksum else 0
        return True

    def at_frame_end(self) -> bool:
        return self._state == "magic" and not self._skip and self._pos >= len(self._buf)


class _FrameWatch:
    def __init__(self, src: Readable) -> None:
        self.src, self.frames, self.total = src, ZstdFrames(), 0

    def read(self, n: int) -> bytes:
        block = self.src.read(n)
        self.frames.feed(block)
        self.total += len(block)
        return block


class ZstdReader:
    def __init__(self, src: Readable, step: Step, identities: Sequence[Any]) -> None:
        import zstandard

        self._zstd = zstandard
        self._watch = _FrameWatch(src)
        self._r = zstandard.ZstdDecompressor().stream_reader(
            self._watch, read_size=READ_BLOCK,  # type: ignore[arg-type]
            read_across_frames=True)

    def read(self, n: int) -> bytes:
        try:
            out = self._r.read(n)
        except self._zstd.ZstdError as exc:
            raise _corrupt(f"the backup is not valid zstd: {exc}") from None
        if not out and (self._watch.total == 0 or not self._watch.frames.at_frame_end()):
            raise _corrupt("the backup's zstd stream is truncated")
        return bytes(out)


# ---------------------------------------------------------------------------- age
def _load_recipients(lines: Sequence[str]) -> list[Any]:
    import pyrage

    out = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            if text.startswith("age1"):
                out.append(pyrage.x25519.Recipient.from_str(text))
            elif text.startswith(("ssh-ed25519 ", "ssh-rsa ")):
                out.append(pyrage.ssh.Recipient.from_str(text))
            else:
                raise ValueError("not an age1… or ssh-ed25519/ssh-rsa public key")
        except Exception as exc:
            raise PipelineError(f"an encryption recipient could not be loaded "
                                f"({recipient_fingerprint(text)}): {exc}",
                                code="encryption_unavailable") from None
    if not out:
        raise PipelineError("encryption is configured but no recipient could be loaded",
                            code="encryption_unavailable")
    return out


def recipient_fingerprint(recipient: str) -> str:
    """What a manifest says about a recipient: a digest, never the key itself."""
    return "sha256:" + hashlib.sha256(recipient.strip().encode()).hexdigest()[:16]


def identities_from_file(path: str) -> list[Any]:
    """The identities in an `encryption.identity_file`; unreadable: `identity_required`."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise PipelineError(f"the identity_file {path} cannot be read ({exc.strerror})",
                            code="identity_required") from None
    return load_identities(text)


def load_identities(text: str) -> list[Any]:
    """age X25519 identities (AGE-SECRET-KEY-… lines) or one unencrypted SSH private key."""
    import pyrage

    ids: list[Any] = []
    try:
        if "PRIVATE KEY-----" in text:
            ids.append(pyrage.ssh.Identity.from_buffer(text.encode()))
        else:
            for line in text.splitlines():
                if line.strip().startswith("AGE-SECRET-KEY-"):
                    ids.append(pyrage.x25519.Identity.from_str(line.strip()))
    except Exception:
        raise Unprocessable("the age identity could not be read (expected AGE-SECRET-KEY-… "
                         "lines or an unencrypted SSH private key)",
                         code="invalid_identity") from None
    if not ids:
        raise Unprocessable("no age identity found (expected AGE-SECRET-KEY-… lines)",
                         code="invalid_identity")
    return ids


_EOF = object()
_ABORT = object()


class _Closed(Exception):
    pass


class AgeEncrypt:
    """pyrage's `encrypt_io` streams (8 KiB reads, 64 KiB writes) but is one blocking call;
    it runs in its own thread, fed through a small bounded queue."""

    def __init__(self, recipients: Sequence[str]) -> None:
        import pyrage

        self._recipients = _load_recipients(recipients)  # fails before any byte is written
        self._source = _QueueSource()
        self._sink = _ListSink()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(pyrage,), daemon=True,
                                        name="age-encrypt")
        self._thread.start()

    def _run(self, pyrage: Any) -> None:
        try:
            pyrage.encrypt_io(self._source, self._sink, self._recipients)
        except BaseException as exc:  # reported by feed/flush
            self._error = exc
            self._source.broken = True

    def _check(self) -> None:
        if self._error is not None:
            raise PipelineError(f"age encryption failed: {self._error}")

    def feed(self, data: bytes) -> bytes:
        self._check()
        if data:
            self._source.put(data)
        return self._sink.take()

    def flush(self) -> bytes:
        self._source.put(_EOF)
        self._thread.join()
        self._check()
        return self._sink.take()

    def close(self) -> None:
        """Stop the thread of a stream that will not be finished (the backup failed)."""
        if self._thread.is_alive():
            self._source.abort()
            self._thread.join(5)


class _QueueSource:
    def __init__(self) -> None:
        self.q: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.buf = b""
        self.broken = False

    def put(self, item: Any) -> None:
        while True:  # never block forever on a consumer thread that died
            if self.broken:
                return
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        self.broken = True
        while True:  # make room, then wake the reader with an error
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.q.put_nowait(_ABORT)

    def read(self, n: int = -1) -> bytes:
        while not self.buf:
            item = self.q.get()
            if item is _EOF:
                return b""
            if item is _ABORT:
                raise _Closed
            self.buf = item
        n = n if n and n > 0 else len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class _ListSink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.lock = threading.Lock()

    def write(self, data: bytes) -> int:
        with self.lock:
            self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        with self.lock:
            out, self.parts = b"".join(self.parts), []
        return out


class AgeReader:
    """Decrypts in a thread (`pyrage.decrypt_io`), handing plaintext over a bounded queue.
    age authenticates every 64 KiB chunk and the final one, so bytes come out only after
    their tag checked and a truncated file fails at its end."""

    def __init__(self, src: Readable, step: Step, identities: Sequence[Any]) -> None:
        import pyrage

        if not identities:
            raise PipelineError("the backup is age-encrypted and no identity is available: "
                                "set the target's encryption.identity_file on the worker, "
                                "or send the identity with the restore or drill (\"identity\" "
                                "in the body; the CLI's --identity-file)",
                                code="identity_required")
        self._src = src
        self._q: queue.Queue[Any] = queue.Queue(maxsize=8)
        self._buf = b""
        self._closed = False
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(pyrage, list(identities)),
                                        daemon=True, name="age-decrypt")
        self._thread.start()

    def _run(self, pyrage: Any, identities: list[Any]) -> None:
        try:
            pyrage.decrypt_io(_ReadOnly(self._src), _QueueWriter(self), identities)
            self._q.put(_EOF)
        except _Closed:
            pass
        except BaseException as exc:
            if not self._closed:
                self._q.put(exc)

    def put(self, data: bytes) -> None:
        while True:
            if self._closed:
                raise _Closed
            try:
                self._q.put(data, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, n: int) -> bytes:
        while not self._buf:
            if self._done:
                return b""
            try:
                item = self._q.get(timeout=0.2)
            except queue.Empty:
                if self._closed:
                    raise PipelineError("reading the backup was stopped") from None
                continue
            if item is _EOF:
                self._done = True
                return b""
            if isinstance(item, BaseException):
                self._done = True
                if isinstance(item, PipelineError):
                    raise item
                text = str(item)
                if "no matching keys" in text.lower():
                    raise PipelineError("the age identity does not match this backup's "
                                        "recipients; nothing was touched",
                                        code="wrong_identity")
                raise _corrupt(f"the backup could not be decrypted: {text}")
            self._buf = item
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def stop(self) -> None:
        """Make a blocked or future `read` return (from any thread)."""
        self._closed = True

    def close(self) -> None:
        self._closed = True
        src_stop = getattr(self._src, "stop", None)
        if src_stop is not None:
            src_stop()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass


class _QueueWriter:
    def __init__(self, owner: AgeReader) -> None:
        self._owner = owner

    def write(self, data: bytes) -> int:
        self._owner.put(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class _ReadOnly:
    """Gives pyrage a file-like with `read` only, over any Readable."""

    def __init__(self, src: Readable) -> None:
        self._src = src

    def read(self, n: int = -1) -> bytes:
        return self._src.read(n if n and n > 0 else CHUNK)


class AutoReader:
    """Inside an encrypted upload that could not be opened when it arrived: decode gzip or
    zstd when the first bytes say so, else pass the bytes through."""

    def __init__(self, src: Readable, step: Step, identities: Sequence[Any]) -> None:
        head = b""
        while len(head) < 4:
            more = src.read(4 - len(head))
            if not more:
                break
            head += more
        self._head = head
        inner = _Prefixed(head, src)
        kind = sniff(head)
        self._r: Readable = (GzipReader(inner, step, identities) if kind == "gzip" else
                             ZstdReader(inner, step, identities) if kind == "zstd" else inner)

    def read(self, n: int) -> bytes:
        return self._r.read(n)


class _Prefixed:
    def __init__(self, head: bytes, src: Readable) -> None:
        self._head, self._src = head, src

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._src.read(n)


# ---------------------------------------------------------------------------- registry
ENCODERS: dict[str, Callable[[Step], Stage]] = {
    "gzip": lambda s: GzipCompress(int(s.get("level", 1))),
    "zstd": lambda s: ZstdCompress(int(s.get("level", 3)), int(s.get("threads", 0))),
    "age": lambda s: AgeEncrypt(s["recipient_keys"]),
}
DECODERS: dict[str, Callable[[Readable, Step, Sequence[Any]], Readable]] = {
    "gzip": GzipReader,
    "zstd": ZstdReader,
    "age": AgeReader,
    "auto": AutoReader,
}
CONTENT_TYPES = {"gzip": "application/gzip", "zstd": "application/zstd",
                 "age": "application/octet-stream"}


def encoders(chain: Sequence[Step]) -> list[Stage]:
    return [ENCODERS[step["codec"]](step) for step in chain]


def recorded(chain: Sequence[Step]) -> list[dict[str, Any]]:
    """What the manifest keeps of a chain: parameters, never keys."""
    return [{k: v for k, v in step.items() if k != "recipient_keys"} for step in chain]


def chain_of(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The decoding chain of a stored backup, from its manifest: `codecs`, or an older
    manifest's `compression` ({"algorithm": "gzip"} or null). Only a hand-written manifest
    silent on both falls back to the file name's suffixes."""
    chain = manifest.get("codecs")
    if chain is None and "compression" in manifest:
        comp = manifest.get("compression")
        chain = [{"codec": "gzip"}] if isinstance(comp, Mapping) and comp else []
    elif chain is None:
        name = str(manifest.get("filename", ""))
        chain = [{"codec": c} for c, suffix in (("gzip", ".gz"), ("zstd", ".zst"))
                 if f"{suffix}." in f"{name}." and not name.endswith(".json")]
        chain += [{"codec": "age"}] if name.endswith(".age") else []
    if not isinstance(chain, list) or not all(
            isinstance(s, Mapping) and s.get("codec") in DECODERS for s in chain):
        raise _corrupt(f"the manifest names an unknown codec chain: {chain!r}")
    return [dict(s) for s in chain]


def sniff(head: bytes) -> str | None:
    """The outermost codec of a file from its first bytes (uploads), or None for plain."""
    if head.startswith(AGE_MAGIC):
        return "age"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def content_type(chain: Sequence[Step]) -> str:
    return CONTENT_TYPES[chain[-1]["codec"]] if chain else "application/octet-stream"


class ExpansionLimit(PipelineError):
    """A backup inflates past the configured bound (a decompression bomb, or a lie)."""

    code = "expansion_limit"
    status = 413


def plain_limit(stored_size: int, *, max_bytes: int, ratio: float,
                declared: int | None = None) -> int:
    """How many plain bytes a stored file may inflate to: what its manifest declares when it
    does (Safehold measured it at backup or upload time), else `ratio` × its stored size;
    never more than `max_bytes`."""
    bound = declared if declared is not None else int(stored_size * ratio) + (1 << 20)
    return min(bound, max_bytes)


class _Hashing:
    def __init__(self, src: Readable, on_stored: Callable[[int], None] | None) -> None:
        self.src, self.on_stored = src, on_stored
        self.digest = hashlib.sha256()
        self.total = 0

    def stop(self) -> None:
        src_stop = getattr(self.src, "stop", None)
        if src_stop is not None:
            src_stop()

    def read(self, n: int) -> bytes:
        block = self.src.read(n)
        if block:
            self.digest.update(block)
            self.total += len(block)
            if self.on_stored:
                self.on_stored(len(block))
        return block


class WindowDigests:
    """The sha256 of each WINDOW-byte slice of a stream (the last one shorter), however
    the stream is cut into chunks: 32 bytes per 4 MiB (8 MB for 1 TB), kept in one
    buffer. A restore reads a backup twice (checked whole, then loaded); the load passes
    on each window only once it hashes to what the check read."""

    WINDOW = 4 << 20

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.digests = bytearray()
        self._hash = hashlib.sha256()
        self._filled = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.window - self._filled)
            self._hash.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.window:
                self.digests += self._hash.digest()
                self._hash, self._filled = hashlib.sha256(), 0

    def finish(self) -> bytes:
        if self._filled:
            self.digests += self._hash.digest()
            self._hash, self._filled = hashlib.sha256(), 0
        return bytes(self.digests)


class PlainReader:
    """Blocking reader of a stored backup's plain content in chunks of at most CHUNK bytes.

    `raw` gives the stored bytes (a file, or a store's stream bridged to a thread). Hashes
    them as it goes: with `expect_sha256` the end of the stream is only reported after the
    digest matched (IntegrityError otherwise), so a consumer that acts at end-of-stream (a
    COMMIT) acts only on verified bytes. Stops with ExpansionLimit as soon as the output
    passes `limit`. Bytes after the end of the outermost codec are refused."""

    def __init__(self, raw: Readable, chain: Sequence[Step], *, limit: int | None = None,
                 expect_sha256: str | None = None,
                 on_stored: Callable[[int], None] | None = None,
                 identities: Sequence[Any] = (), close: Callable[[], None] | None = None
                 ) -> None:
        self._hashing = _Hashing(raw, on_stored)
        self._chain = list(chain)
        self._limit = limit
        self._expect = expect_sha256
        self._close = close
        self._readers: list[Any] = []
        top: Readable = self._hashing
        for step in reversed(self._chain):  # the outermost codec reads the stored bytes
            top = DECODERS[step["codec"]](top, step, identities)
            self._readers.append(top)
        self._top = top
        self.plain_bytes = 0

    def next_chunk(self) -> bytes | None:
        out = self._top.read(CHUNK)
        if not out:
            if self._hashing.read(1):  # the outermost codec ended before the file did
                raise _corrupt("the backup has data after the end of its "
                               f"{self._chain[-1]['codec'] if self._chain else 'content'}")
            self._check_digest()
            return None
        self.plain_bytes += len(out)
        if self._limit is not None and self.plain_bytes > self._limit:
            raise ExpansionLimit(
                f"the backup inflates past {self._limit:,} bytes (a decompression bomb, or "
                "not what its manifest says); stopped there. Raise [limits] "
                "max_expansion_ratio / max_restore_bytes if it is genuine")
        return out

    def _check_digest(self) -> None:
        if self._expect is not None and self._hashing.digest.hexdigest() != self._expect:
            raise IntegrityError("the backup's bytes changed while it was being read (sha256 "
                                 "no longer matches its manifest); nothing was committed")

    @property
    def sha256(self) -> str:
        return self._hashing.digest.hexdigest()

    @property
    def stored_bytes(self) -> int:
        return self._hashing.total

    def drain_stored(self) -> None:
        """Read (and hash) the rest of the stored bytes without decoding them."""
        while self._hashing.read(CHUNK):
            pass

    def stop(self) -> None:
        """From another thread: make the reading thread's next (or blocked) read fail soon,
        so that it can be awaited instead of abandoned."""
        for r in self._readers:
            if hasattr(r, "stop"):
                r.stop()
        self._hashing.stop()

    def close(self) -> None:
        for r in reversed(self._readers):
            if hasattr(r, "close"):
                r.close()
        if self._close is not None:
            self._close()

    def __iter__(self) -> Iterator[bytes]:
        while (out := self.next_chunk()) is not None:
            yield out
