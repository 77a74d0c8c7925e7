"""The server's globals at the head of a plain-SQL dump (issue 21), for every engine that
has them: each line of what the server's own tool wrote (`pg_dumpall --globals-only`, the
accounts and grants of a MySQL database) commented out as `-- G <line>`, before the dump.

A comment to psql and to the mysql client alike, so loading the file by hand never touches
the server's roles or users; one `awk` takes them out for a new server. The engines read
the head back with `GlobalsHead` (bounded, streaming) and parse it as untrusted input.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator

from shared.formats.pgscript import UnsafeScript

PREFIX = b"-- G "
HEAD_MAX = 64 << 20  # the head's bytes; a server's globals are kilobytes to a few MiB
# the by-hand recipe: the head's lines, unprefixed, up to the dump's first line
# (only the head: leading comment lines, then `-- G` lines; the first other line ends it,
# so a `-- G` text in the data further down is never taken)
AWK = ("awk '/^-- G/ {sub(/^-- G ?/, \"\"); print; n++; next} /^--|^$/ && !n {next} "
       "{exit}'")


async def commented(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks` with every line prefixed by `-- G ` (streaming; a last line without its
    newline gets one)."""
    carry = b""
    async for data in chunks:
        data = carry + data
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            yield b"".join(PREFIX + line + b"\n" for line in data[:cut - 1].split(b"\n"))
    if carry:
        yield PREFIX + carry + b"\n"


class GlobalsHead:
    """Collects the `-- G` lines at the head of a script (after leading `--` comments and
    blank lines); `done` once the first other line is seen. Everything fed stays in
    `held` for the caller to pass on unchanged (the lines are comments to psql)."""

    def __init__(self) -> None:
        self.held = bytearray()
        self.lines: list[bytes] = []
        self.done = False
        self.first_line = 0  # of the first `-- G` line (1-based)
        self._at = 0
        self._seen = 0

    def feed(self, data: bytes) -> None:
        self.held += data
        while not self.done:
            end = self.held.find(b"\n", self._at)
            if end < 0:
                break
            self._line(bytes(self.held[self._at:end]))
            self._at = end + 1
        if not self.done and len(self.held) > HEAD_MAX:
            raise UnsafeScript(self.first_line or 1, f"the globals at the head of the "
                               f"backup exceed {HEAD_MAX >> 20} MiB", code="unsafe_backup")

    def finish(self) -> None:
        """End of input: a last line without a newline is still a line."""
        if not self.done and self._at < len(self.held):
            self._line(bytes(self.held[self._at:]))
        self.done = True

    def _line(self, line: bytes) -> None:
        self._seen += 1
        if line == PREFIX.rstrip() or line.startswith(PREFIX):
            self.first_line = self.first_line or self._seen
            self.lines.append(line[len(PREFIX):])
        elif self.lines or not (line.startswith(b"--") or not line.strip()):
            self.done = True  # the first line of the database's dump




Token = tuple[str, str]  # (kind, value)


def statements(lines: list[bytes], token: re.Pattern[str], trailer: re.Pattern[str],
               normalize: Callable[[str, str], Token], bad: Callable[[str], Exception],
               skip: Callable[[str], bool] = lambda line: False) -> Iterator[list[Token]]:
    """The head's text as statements of tokens (split at `;`), for an engine's parser:
    `token` matches one token (leading blanks and comments included) with named groups,
    `trailer` what may end the text, `normalize(group, text)` gives the token, `bad(what)`
    the exception refusing the head; lines `skip` says are left out."""
    text: list[str] = []
    for raw in lines:
        if b"\0" in raw or b"\r" in raw:
            raise bad("a NUL or carriage return")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad("text that is not UTF-8") from None
        if not skip(line):
            text.append(line)
    joined = "\n".join(text)
    statement: list[Token] = []
    at = 0
    while at < len(joined) and not trailer.fullmatch(joined, at):
        m = token.match(joined, at)
        if not m:
            raise bad(f"text it cannot read ({joined[at:at + 40]!r})")
        kind = m.lastgroup or ""
        tok = normalize(kind, m.group(kind))
        at = m.end()
        if tok == ("punct", ";"):
            if statement:
                yield statement
            statement = []
            continue
        statement.append(tok)
        if len(statement) > 10_000:
            raise bad("a statement of over 10,000 tokens")
    if statement:
        raise bad("a statement without its ';'")
