"""Where each statement of a mysql-client script starts, found as the client splits them.

The `mariadb`/`mysql` client sends the server one statement at a time, cut at the current
delimiter (`;`, or what a `DELIMITER` line sets, as mysqldump does around routines and
triggers) outside quotes, backticks and comments — and inside executable comments
(`/*!50001 … */`, `/*M!… */`), which are code. A check that looks only at line starts misses
`SELECT 1; GRANT ALL ON *.* TO x;` on one line. `StatementStarts` follows the same rules
over a stream (any chunking, memory bounded by one statement's head) and hands the first
bytes of every statement, comments and executable-comment markers removed, to a callback
with its line number.

Strings are read with backslash escapes (the server's default, and how mysqldump writes
them); a file that turns them off (`NO_BACKSLASH_ESCAPES`) would make the server read the
text differently, so the check refuses the word anywhere (formats.MySQLScriptCheck).
"""

from __future__ import annotations

import re
from collections.abc import Callable

HEAD = 256  # bytes of a statement's start handed to the callback
_QUOTE_END = {b"'": re.compile(rb"\\.|'", re.S), b'"': re.compile(rb'\\.|"', re.S),
              b"`": re.compile(rb"`")}
_BLOCK_END = re.compile(rb"\*/")
# code and whole string literals in one C-speed match (INSERT lines are mostly strings):
# stops before a comment, a `;`, a string cut by the chunk's end, and (`_BULK`, while a
# statement's start is read) a newline
_BULK_PARTS = (rb"""'[^'\\]*(?:\\.[^'\\]*)*'|"[^"\\]*(?:\\.[^"\\]*)*"|`[^`]*`|"""
               rb"""-(?!-[ \t\r\n])|/(?!\*)|\*(?!/)|\\""")
_BULK = re.compile(rb"""(?:[^'"`#;/*\-\\\n]+|""" + _BULK_PARTS + rb")*", re.S)
_BULK_NL = re.compile(rb"""(?:[^'"`#;/*\-\\]+|""" + _BULK_PARTS + rb")*", re.S)
_LEADING = re.compile(rb"(?:\s+|--[ \t][^\n]*(?:\n|$)|--(?:\n|$)|#[^\n]*(?:\n|$)|"
                      # mariadb-dump's first line: the client's sandbox command, not SQL
                      rb"/\*M!\d*\\-(?:[^*]|\*(?!/))*\*/|"
                      rb"/\*(?![!M])(?:[^*]|\*(?!/))*\*/|/\*M?!\d*|\*/)*")
_DELIMITER = re.compile(rb"(?i)delimiter[ \t]+(\S+)")
_DELIMITER_LINE = re.compile(rb"(?i)delimiter[ \t]")


def strip_leading(head: bytes) -> bytes:
    """A statement's start without leading blanks, comments and executable-comment
    markers (their content is code)."""
    found = _LEADING.match(head)  # (matches the empty string too)
    return head[found.end():] if found else head


class StatementStarts:
    KEEP = 16  # bytes held back at a chunk's end: no token (delimiter included) is longer

    def __init__(self, on_statement: Callable[[bytes, int], None]) -> None:
        self.on_statement = on_statement
        self.delimiter = b";"
        self._special = self._compile(b";")
        self.state = b""  # b"" code, a quote char, b"#" line comment, b"*" block comment
        self.line = 1
        self.head = bytearray()
        self.head_line = 1
        self.carry = b""

    @staticmethod
    def _compile(delimiter: bytes) -> re.Pattern[bytes]:
        return re.compile(rb"['\"`#\n]|--(?=[ \t\r\n])|/\*M?!|/\*|\*/|"
                          + re.escape(delimiter))

    def feed(self, chunk: bytes) -> None:
        data = self.carry + chunk
        at = self._scan(data, max(0, len(data) - self.KEEP))
        self.carry = data[at:]

    def finish(self) -> None:
        """End of input: the last statement, even without its delimiter."""
        data, self.carry = self.carry, b""
        self._scan(data + b"\n", len(data))
        self._end_statement()

    def _take(self, piece: bytes) -> None:
        if len(self.head) < HEAD:
            if not self.head:
                if not piece.strip():
                    self.line += piece.count(b"\n")
                    return
                self.head_line = self.line
            self.head += piece[:HEAD - len(self.head)]
        self.line += piece.count(b"\n")

    def _end_statement(self) -> None:
        head = bytes(self.head)
        text = strip_leading(head)
        if text:
            skipped = head[:len(head) - len(text)]
            self.on_statement(text, self.head_line + skipped.count(b"\n"))
        self.head = bytearray()

    def _scan(self, data: bytes, limit: int) -> int:
        """Read data[:limit] (a token starting before `limit` may end after it); return
        where the next call starts."""
        at = 0
        while at < limit:
            if self.state in _QUOTE_END:
                m = _QUOTE_END[self.state].search(data, at)
                if m is None or m.start() >= limit:
                    self._take(data[at:limit])
                    return limit
                self._take(data[at:m.end()])
                at = m.end()
                if m.group() == self.state:  # else an escape, skipped
                    self.state = b""
                continue
            if self.state == b"#":
                nl = data.find(b"\n", at, limit)
                if nl < 0:
                    self._take(data[at:limit])
                    return limit
                self._take(data[at:nl])
                at, self.state = nl, b""  # the newline is read as code
                continue
            if self.state == b"*":
                m = _BLOCK_END.search(data, at)
                if m is None or m.start() >= limit:
                    self._take(data[at:limit])
                    return limit
                self._take(data[at:m.end()])
                at, self.state = m.end(), b""
                continue
            if self.delimiter == b";":  # the common case, fast; DELIMITER blocks are small
                bulk = (_BULK_NL if len(self.head) >= HEAD else _BULK).match(data, at, limit)
                end = bulk.end() if bulk else at  # (the pattern matches the empty string)
                if end == limit:  # a `--`, `/*` or `*/` may go on past the cut
                    end -= 2 if data[end - 2:end] == b"--" else int(
                        data[end - 1:end] in (b"-", b"/", b"*"))
                if end > at:
                    self._take(data[at:end])
                    at = end
                    if at >= limit:
                        return at
            m = self._special.search(data, at)
            if m is None or m.start() >= limit:
                self._take(data[at:limit])
                return limit
            self._take(data[at:m.start()])
            token, at = m.group(), m.end()
            if token == b"\n":
                found = _DELIMITER.fullmatch(strip_leading(bytes(self.head)).rstrip())
                self.line += 1
                if found:  # a client command of its own line: the statements' new end
                    if len(found.group(1)) > self.KEEP:
                        raise ValueError("a DELIMITER longer than 16 bytes")
                    self.delimiter = found.group(1)
                    self._special = self._compile(self.delimiter)
                    self.head = bytearray()
                elif self.head and len(self.head) < HEAD:
                    self.head += token
            elif token == self.delimiter:
                if _DELIMITER_LINE.match(strip_leading(bytes(self.head))):
                    self.head += token  # `DELIMITER ;;`: the client reads the whole line
                else:
                    self._end_statement()
            elif token in _QUOTE_END:
                self._take(token)
                self.state = token
            elif token in (b"#", b"--"):
                self._take(token)
                self.state = b"#"
            elif token == b"/*":
                self._take(token)
                self.state = b"*"
            else:  # /*! /*M! */ : executable comment markers, code on both sides
                self._take(token)
        return at
