"""Backup sets (issue 21): one backup of a whole server — every database of a PostgreSQL or
MySQL/MariaDB target with `databases = "*"` (or a list) — as ONE file, so that listing,
retention, downloads, every destination and the checksum treat the set as one backup.

The plain stream is a header of comment lines, then per database a marker line and that
database's dump exactly as a one-database backup of it would be (its globals head, then the
tool's output), then an end marker:

    -- Safehold set <token> member "app"
    …a complete dump of app…
    -- Safehold set <token> member "billing"
    …
    -- Safehold set <token> end

Markers are comment lines (to psql and to the mysql client), found only at line starts and
only with the set's random token (recorded in the manifest), which nothing in the databases'
content can know when the backup is made: a table's data cannot fake a boundary. Everything
read back is untrusted: text before the first marker must be comment lines, a marker names
its database in JSON (one line, any name), nothing may follow the end marker, and each
member is then checked by its engine's own validator (`validate_set`).

`SetSplitter` is a push parser shared by the checks (sync) and the worker's load and drills
(async): memory stays bounded by one chunk plus one marker line.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from shared.engines import ENGINES
from shared.errors import PipelineError

if TYPE_CHECKING:  # shared.formats checks sets through this module
    from shared.formats.common import FileFacts, MemberFacts

TOKEN = re.compile(r"[0-9a-f]{16,64}")
HEADER_MAX = 64 << 10
LINE_MAX = 4096
Event = tuple[str, str | bytes | None]  # ("member", name) | ("data", bytes) | ("end", None)


def _bad(what: str) -> PipelineError:
    return PipelineError(f"not a valid backup set: {what}", code="corrupt_backup")


def prefix(token: str) -> bytes:
    return f"-- Safehold set {token} ".encode()


def member_line(token: str, name: str) -> bytes:
    # JSON keeps any name on one line; non-ASCII stays as it is (UTF-8)
    return prefix(token) + b"member " + json.dumps(name, ensure_ascii=False).encode() + b"\n"


def end_line(token: str) -> bytes:
    return prefix(token) + b"end\n"


def header(token: str, engine: str, names: list[str]) -> bytes:
    how = ENGINES[engine].by_hand.replace("<file>", "<db>.sql")
    return (f"--\n-- Safehold backup set {token}: {len(names)} database(s), each a complete "
            f"one-database backup\n-- after its marker line. By hand: split it "
            f"(see the README, \"Server targets\"), then\n-- {how}\n--\n").encode()


def token_of(manifest: Mapping[str, object]) -> str | None:
    """The set's token from a (hostile) manifest; None when it is no set."""
    found = manifest.get("set")
    if found is None:
        return None
    token = found.get("token") if isinstance(found, dict) else None
    if not isinstance(token, str) or not TOKEN.fullmatch(token):
        raise _bad("its manifest's set token is malformed")
    return token


def member_entries(manifest: Mapping[str, object]) -> list[dict[str, object]] | None:
    """A (hostile) manifest's member entries as listed, dicts only; None when it holds no
    set (or its members are not a list). The one reading of `set.members`."""
    found = manifest.get("set")
    members = found.get("members") if isinstance(found, dict) else None
    return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else None


class SetSplitter:
    """Push bytes, get events. Data of a member is passed on as it comes, except the last
    bytes that could be the start of a marker."""

    def __init__(self, token: str) -> None:
        self.marker = b"\n" + prefix(token)
        # a marker is found after a newline; the one in front of the stream, and the one
        # ending a marker line, are not data ("virtual")
        self.buf = b"\n"
        self.virtual = True
        self.state = "header"  # → "member" → "end"
        self.header = b""
        self.names: list[str] = []

    def feed(self, data: bytes) -> list[Event]:
        self.buf += data
        out: list[Event] = []
        while True:
            at = self.buf.find(self.marker)
            if at < 0:
                keep = len(self.marker) - 1
                if len(self.buf) > keep:
                    self._emit(len(self.buf) - keep, out)
                return out
            eol = self.buf.find(b"\n", at + len(self.marker))
            if eol < 0:
                if len(self.buf) - at > LINE_MAX:
                    raise _bad("a marker line longer than 4 KiB")
                self._emit(at, out)
                return out
            self._emit(at + 1, out)  # a member's last newline is its own
            end = eol - at - 1  # buf now starts with the marker line (less its newline)
            self._marker(self.buf[len(self.marker) - 1:end], out)
            self.buf = self.buf[end:]  # its newline: where the next search starts
            self.virtual = True

    def finish(self) -> list[Event]:
        out: list[Event] = []
        self._emit(len(self.buf), out)
        if self.state != "end":
            raise _bad("it ends before its end marker (cut off)")
        return out

    def _emit(self, upto: int, out: list[Event]) -> None:
        """Pass on buf[:upto] (less a virtual newline) and keep the rest."""
        data, self.buf = self.buf[:upto], self.buf[upto:]
        if self.virtual and data:
            data, self.virtual = data[1:], False
        self._data(data, out)

    def _data(self, data: bytes, out: list[Event]) -> None:
        if not data:
            return
        if self.state == "member":
            out.append(("data", data))
        elif self.state == "header":  # checked whole at the first marker
            self.header += data
            if len(self.header) > HEADER_MAX:
                raise _bad("more than 64 KiB before its first member")
        elif data.strip():
            raise _bad("data after its end marker")

    def _marker(self, rest: bytes, out: list[Event]) -> None:
        if self.state == "end":
            raise _bad("a marker after its end marker")
        if self.state == "header" and any(line.strip() and not line.startswith(b"--")
                                          for line in self.header.split(b"\n")):
            raise _bad("text other than comments before its first member")
        if rest == b"end":
            self.state = "end"
            out.append(("end", None))
            return
        if not rest.startswith(b"member "):
            raise _bad("a marker it cannot read")
        try:
            name = json.loads(rest[len(b"member "):])
        except ValueError:
            raise _bad("a marker whose database name is not JSON") from None
        if not isinstance(name, str) or not 0 < len(name) <= 255 or "\0" in name:
            raise _bad("a marker without a database name")
        if name in self.names:
            raise _bad(f"database {name!r} twice")
        self.names.append(name)
        self.state = "member"
        out.append(("member", name))


def iter_members(chunks: Iterator[bytes], token: str
                 ) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(database, its bytes) in file order; each member's iterator is drained before the
    next is given (a caller that stops early just skips the rest)."""
    splitter = SetSplitter(token)
    pending: list[Event] = []
    source = iter(chunks)
    done = False

    def pull() -> bool:
        nonlocal done
        if done:
            return False
        chunk = next(source, None)
        if chunk is None:
            pending.extend(splitter.finish())
            done = True
        else:
            pending.extend(splitter.feed(chunk))
        return True

    def body() -> Iterator[bytes]:
        while True:
            while not pending:
                if not pull():
                    return
            if pending[0][0] != "data":
                return
            data = pending.pop(0)[1]
            assert isinstance(data, bytes)
            yield data

    while True:
        while not pending:
            if not pull():
                raise _bad("it ends before its end marker (cut off)")
        kind, value = pending.pop(0)
        if kind == "end":
            while pull():  # whatever follows is checked (and must be nothing)
                pending.clear()
            return
        if kind == "member" and isinstance(value, str):
            it = body()
            yield value, it
            for _ in it:  # the caller did not read it all
                pass


async def members(chunks: AsyncIterator[bytes], token: str
                  ) -> AsyncIterator[tuple[str, AsyncIterator[bytes]]]:
    """The async twin of `iter_members`."""
    splitter = SetSplitter(token)
    pending: list[Event] = []
    source = chunks.__aiter__()
    done = False

    async def pull() -> bool:
        nonlocal done
        if done:
            return False
        try:
            chunk = await source.__anext__()
        except StopAsyncIteration:
            pending.extend(splitter.finish())
            done = True
        else:
            pending.extend(splitter.feed(chunk))
        return True

    async def body() -> AsyncIterator[bytes]:
        while True:
            while not pending:
                if not await pull():
                    return
            if pending[0][0] != "data":
                return
            data = pending.pop(0)[1]
            assert isinstance(data, bytes)
            yield data

    while True:
        while not pending:
            if not await pull():
                raise _bad("it ends before its end marker (cut off)")
        kind, value = pending.pop(0)
        if kind == "end":
            while await pull():
                pending.clear()
            return
        if kind == "member" and isinstance(value, str):
            it = body()
            yield value, it
            async for _ in it:
                pass


def validate_set(validator: Callable[[Iterator[bytes]], FileFacts], token: str
                 ) -> Callable[[Iterator[bytes]], FileFacts]:
    """A validator for a set: each member checked by the engine's own `validator`."""
    def check(chunks: Iterator[bytes]) -> FileFacts:
        found: list[MemberFacts] = []
        size = 0

        def counted(it: Iterator[bytes]) -> Iterator[bytes]:
            nonlocal size
            for chunk in it:
                size += len(chunk)
                yield chunk
        for name, body in iter_members(counted(chunks), token):
            facts = validator(body)
            member: MemberFacts = {"database": name}
            if "counts" in facts:
                member["counts"] = facts["counts"]
            if "count_kind" in facts:
                member["count_kind"] = facts["count_kind"]
            found.append(member)
        if not found:
            raise _bad("no database in it")
        return {"raw_bytes": size, "set_members": found}
    return check
