"""age encryption (pyrage): recipients and identities, a push encrypter on a thread and a
pull decrypter, both bounded."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Sequence
from typing import Any

from shared.codecs.base import CHUNK, AgeKey, Readable, Step, corrupt
from shared.errors import PipelineError, Unprocessable


# ---------------------------------------------------------------------------- age
def _load_recipients(lines: Sequence[str]) -> list[AgeKey]:
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


def identities_from_file(path: str) -> list[AgeKey]:
    """The identities in an `encryption.identity_file`; unreadable: `identity_required`."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise PipelineError(f"the identity_file {path} cannot be read ({exc.strerror})",
                            code="identity_required") from None
    return load_identities(text)


def load_identities(text: str) -> list[AgeKey]:
    """age X25519 identities (AGE-SECRET-KEY-… lines) or one unencrypted SSH private key."""
    import pyrage

    ids: list[AgeKey] = []
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

    def __init__(self, src: Readable, step: Step, identities: Sequence[AgeKey]) -> None:
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

    def _run(self, pyrage: Any, identities: list[AgeKey]) -> None:
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
                raise corrupt(f"the backup could not be decrypted: {text}")
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

