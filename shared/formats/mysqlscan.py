"""Where each statement of a mysql-client script starts, found as the client splits them —
and a refusal wherever the client and the server could read the script differently.

The `mariadb`/`mysql` client cuts a script into statements at the current delimiter (`;`,
or what a `DELIMITER` line sets, as mysqldump does around routines and triggers) outside
quotes, backticks and comments — and inside executable comments (`/*!50001 … */`), which are
code — and sends them with multi-statements on, so the server splits what it receives
again with its own lexer. A check that copies only the client's splitting is fooled
wherever the two part: an executable comment for a newer server (the server skips it, the
client reads its quote as a string), `--` before a control character (a comment to the
server only), a line starting with `--x` (a comment to the client only), a backslash
outside strings (client commands such as `\\C gbk`), a `DELIMITER` the client reads
differently, a character set or `sql_mode` that changes how strings end. So the scanner
accepts only what mysqldump/mariadb-dump write there and refuses the rest (ValueError);
the settings (sql_mode, character sets) are checked by the caller on each statement
(formats.mysql.MySQLScriptCheck), which gets the first bytes of every statement, comments and
executable-comment markers removed, with its line number.

Memory stays bounded by one statement's head; any chunking gives the same result.
"""

from __future__ import annotations

import re
from collections.abc import Callable

HEAD = 256  # bytes of a statement's start handed to the callback
MAX_VERSION = 80040  # /*!NNNNN … */ up to here: every server Safehold restores runs them
SANDBOX = b"/*M!999999\\- enable the sandbox mode */"  # mariadb-dump's first line
_QUOTE_END = {b"'": re.compile(rb"\\.|'", re.S), b'"': re.compile(rb'\\.|"', re.S),
              b"`": re.compile(rb"`")}
_BLOCK_END = re.compile(rb"\*/")
# code and whole string literals in one C-speed match (INSERT lines are mostly strings):
# stops before a comment, a `;`, any `--`, a backslash, a string cut by the chunk's end,
# and (`_BULK`, while a statement's start is read) a newline
_BULK_PARTS = (rb"""'[^'\\]*(?:\\.[^'\\]*)*'|"[^"\\]*(?:\\.[^"\\]*)*"|`[^`]*`|"""
               rb"""-(?!-)|/(?!\*)|\*(?!/)""")
_BULK = re.compile(rb"""(?:[^'"`#;/*\-\\\n]+|""" + _BULK_PARTS + rb")*", re.S)
_BULK_NL = re.compile(rb"""(?:[^'"`#;/*\-\\]+|""" + _BULK_PARTS + rb")*", re.S)
_LEADING = re.compile(rb"(?:\s+|--[ \t][^\n]*(?:\n|$)|--(?:\n|$)|#[^\n]*(?:\n|$)|"
                      rb"/\*(?![!M])(?:[^*]|\*(?!/))*\*/|/\*M?!\d*|\*/)*")
_DELIMITER = re.compile(rb"(?i)delimiter[ \t]+(\S+)")
_DELIMITER_LINE = re.compile(rb"(?i)delimiter[ \t]")
_DELIMITER_LINES = (b"DELIMITER ;;", b"DELIMITER ;")  # what mysqldump writes
_VERSION = re.compile(rb"\d*")


def strip_leading(head: bytes) -> bytes:
    """A statement's start without leading blanks, comments and executable-comment
    markers (their content is code)."""
    found = _LEADING.match(head)  # (matches the empty string too)
    return head[found.end():] if found else head


class StatementStarts:
    KEEP = 48  # bytes held back at a chunk's end: no token (sandbox line included) is longer
    DELIMITER_LINES = _DELIMITER_LINES  # the DELIMITER commands the script may hold

    def __init__(self, on_statement: Callable[[bytes, int], None]) -> None:
        self.on_statement = on_statement
        self.delimiter = b";"
        self._special = self._compile(b";")
        self.state = b""  # b"" code, a quote char, b"#" line comment, b"*" block comment
        self.line = 1
        self.head = bytearray()
        self.head_line = 1
        self.carry = b""
        self.quiet = False  # a comment before a statement's first code: not its head
        self.cut_short = False  # the statement just ended was longer than its head

    @staticmethod
    def _compile(delimiter: bytes) -> re.Pattern[bytes]:
        # the delimiter first: the client looks for it before a comment's start
        # (mariadb-binlog's `/*!*/;` is a delimiter, not an executable comment)
        return re.compile(re.escape(delimiter) + rb"|['\"`#\n\\]|--|/\*M?!|/\*|\*/")

    def feed(self, chunk: bytes) -> None:
        data = self.carry + chunk
        at = self._scan(data, max(0, len(data) - self.KEEP))
        self.carry = data[at:]

    def finish(self) -> None:
        """End of input: the last statement, even without its delimiter."""
        data, self.carry = self.carry, b""
        self._scan(data + b"\n", len(data))
        if self.state in _QUOTE_END:
            raise ValueError("a string or quoted name that never ends")
        self._end_statement()

    def _take(self, piece: bytes) -> None:
        if len(self.head) < HEAD and not self.quiet:
            if not self.head:
                if not piece.strip():
                    self.line += piece.count(b"\n")
                    return
                self.head_line = self.line
            self.head += piece[:HEAD - len(self.head)]
        self.line += piece.count(b"\n")

    def _end_statement(self) -> None:
        head = bytes(self.head)
        # only HEAD bytes are kept: a statement that filled them may go on past them
        self.cut_short = len(head) >= HEAD
        text = strip_leading(head)
        if text:
            skipped = head[:len(head) - len(text)]
            self.on_statement(text, self.head_line + skipped.count(b"\n"))
        self.head = bytearray()

    def _comment(self, state: bytes) -> None:
        """A comment starts: before a statement's first code it is not the head's."""
        self.quiet = not strip_leading(bytes(self.head))
        self.state = state

    def _versioned(self, data: bytes, start: int, at: int, token: bytes) -> int:
        """An executable comment: `/*!NNNNN` up to MAX_VERSION is code to every server
        restored to (and to the client); mariadb-dump's sandbox line is the client's own;
        any other `/*M!` (a MySQL server skips what MariaDB runs) must hold nothing the
        two could read apart. Returns where scanning goes on."""
        version = _VERSION.match(data, at)
        digits = version.group() if version else b""
        if token == b"/*!":
            if digits and int(digits) > MAX_VERSION:
                raise ValueError(f"an executable comment for servers from version "
                                 f"{int(digits)} on (older ones skip what the client reads)")
            self._take(data[start:at + len(digits)])
            return at + len(digits)
        if data.startswith(SANDBOX, start):
            return start + len(SANDBOX)  # the client's command: no SQL
        end = data.find(b"*/", at)
        if end < 0:
            if len(data) - start > 4096:
                raise ValueError("a `/*M!` comment of over 4 KiB")
            return -1  # its end is in the next chunk: come back to `start` then
        body = data[at:end]
        if any(c in body for c in (b"'", b'"', b"`", b"#", b"--", b";", b"/*", b"\\")):
            raise ValueError("a `/*M!` comment holding quotes, comments or `;` (MySQL servers "
                             "skip what MariaDB runs)")
        self._take(data[start:end + 2])
        return end + 2

    def _scan(self, data: bytes, limit: int) -> int:  # noqa: C901 - one state machine
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
                at, self.state, self.quiet = nl, b"", False  # the newline is read as code
                continue
            if self.state == b"*":
                m = _BLOCK_END.search(data, at)
                if m is None or m.start() >= limit:
                    self._take(data[at:limit])
                    return limit
                self._take(data[at:m.end()])
                at, self.state, self.quiet = m.end(), b"", False
                continue
            if self.delimiter == b";":  # the common case, fast; DELIMITER blocks are small
                bulk = (_BULK_NL if len(self.head) >= HEAD else _BULK).match(data, at, limit)
                end = bulk.end() if bulk else at  # (the pattern matches the empty string)
                if end == limit and data[end - 1:end] in (b"-", b"/", b"*"):
                    end -= 1  # a `--`, `/*` or `*/` may go on past the cut
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
            token, start, at = m.group(), m.start(), m.end()
            if token == b"\n":
                line = strip_leading(bytes(self.head)).rstrip()
                self.line += 1
                if _DELIMITER_LINE.match(line):  # a client command: the statements' new end
                    found = _DELIMITER.fullmatch(line)
                    if found is None or line not in self.DELIMITER_LINES:
                        raise ValueError(f"a DELIMITER command mysqldump does not write "
                                         f"({line[:40].decode('utf-8', 'replace')!r})")
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
            elif token == b"#":
                self._comment(b"#")
                self._take(token)
            elif token == b"--":
                after = data[at:at + 1]
                if after in (b" ", b"\t", b"\r", b"\n"):
                    self._comment(b"#")
                    self._take(token)
                elif after < b" " or after == b"\x7f":
                    raise ValueError("`--` before a control character (a comment to the "
                                     "server, code to the client)")
                elif start == 0 or data[start - 1:start] == b"\n":
                    raise ValueError("a line starting with `--` and no space (a comment to "
                                     "the client, code to the server)")
                else:
                    self._take(token)  # code to both: minus minus
            elif token == b"\\":
                raise ValueError("a backslash outside a string (a client command such as "
                                 "\\C or \\d)")
            elif token == b"/*":
                self._comment(b"*")
                self._take(token)
            elif token in (b"/*!", b"/*M!"):
                at = self._versioned(data, start, at, token)
                if at < 0:
                    if limit == len(data) - 1:  # (finish: there is no next chunk)
                        raise ValueError("a `/*M!` comment never closed")
                    return start
            else:  # */ : the end of an executable comment, code on both sides
                self._take(token)
        return at
