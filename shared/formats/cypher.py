"""Cypher scripts as Safehold's Neo4j backups hold them: a streaming statement splitter
and the check that keeps a script to the statement shapes the exporters write.

A backup file is untrusted input: an uploaded script could `LOAD CSV` from a URL, call
`apoc.load.*` / `apoc.export.*` (files and URLs), run `dbms.*` procedures or administer
users and roles. `check_statement` accepts the shapes Safehold's exporter writes
(constraints, indexes, `UNWIND … CREATE/MATCH … SET`, the cleanup `MATCH … REMOVE`,
`DROP INDEX|CONSTRAINT`) and APOC's `apoc.export.cypher` shapes, and refuses the rest.
"""

from __future__ import annotations

import re

from shared.errors import BadRequest

FIX_BYTES_MARKER = "// safehold:fix-bytes"
MAX_STATEMENT = 256 << 20  # characters held for one statement, at most


_CODE_SPECIAL = re.compile(r"['\"`;/:]")  # `:` matters only before a statement starts
_CODE_SPECIAL_STARTED = re.compile(r"['\"`;/]")


class StatementSplitter:
    """Splits a Cypher script into statements as it streams in: `;` inside strings,
    backticks or comments does not end one; cypher-shell command lines (`:begin`,
    `:commit`, `:param`…) are skipped; our `// safehold:fix-bytes` marker is kept.
    Runs of ordinary characters are skipped with regex searches (linear time)."""

    def __init__(self) -> None:
        self.buf: list[str] = []  # recent pieces of the current statement
        self.blocks: list[str] = []  # older pieces, joined (many tiny strings cost 50 B each)
        self.size = 0  # characters in `blocks`
        self.started = False  # the current statement has non-blank text
        self.state = "code"  # code | quote | line | block | command
        self.quote = ""
        self.comment: list[str] = []
        self.tail = ""
        self.commands: list[str] = []  # cypher-shell command lines seen (`:begin`…)
        self.lines: list[int] = []  # the line each emitted statement ends on, in order
        self._line = 1  # line at the start of the text being fed
        self._text = ""
        self._counted = (0, 1)  # (position, line) counted so far in that text

    def _line_at(self, at: int) -> int:
        pos, line = self._counted
        line += self._text.count("\n", pos, at)
        self._counted = (at, line)
        return line

    def _emit(self, out: list[str], at: int) -> None:
        stmt = "".join(self.blocks + self.buf).strip()
        self.blocks, self.size = [], 0
        if stmt:
            out.append(stmt)
            self.lines.append(self._line_at(at))
        self.buf, self.started = [], False

    def feed(self, text: str, final: bool = False) -> list[str]:
        text = self.tail + text
        self.tail = ""
        self._text, self._counted = text, (0, self._line)
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if len(self.buf) > 1024:
                block = "".join(self.buf)
                self.blocks.append(block)
                self.size += len(block)
                self.buf = []
                if self.size > MAX_STATEMENT:
                    raise BadRequest(f"a Cypher statement longer than {MAX_STATEMENT >> 20} "
                                     "MiB (the exporters write batches of 1000 rows)",
                                     code="invalid_backup")
            if self.state == "code":
                m = (_CODE_SPECIAL_STARTED if self.started else _CODE_SPECIAL).search(text, i)
                j = m.start() if m else n
                if j > i:
                    run = text[i:j]
                    self.buf.append(run)
                    self.started = self.started or not run.isspace()
                if m is None:
                    break
                c = text[j]
                i = j + 1
                if c == "/" and i == n and not final:
                    self.tail = "/"  # `//` or `/*` may continue in the next chunk
                    break
                if c in "'\"`":
                    self.state, self.quote = "quote", c
                    self.buf.append(c)
                    self.started = True
                elif c == "/" and i < n and text[i] in "/*":
                    self.state = "line" if text[i] == "/" else "block"
                    self.comment = ["//"] if self.state == "line" else []
                    i += 1
                elif c == ";":
                    self._emit(out, j)
                elif c == ":" and not self.started:
                    self.state = "command"
                else:
                    self.buf.append(c)
                    self.started = True
            elif self.state == "quote":
                j = text.find(self.quote, i)
                j = n if j < 0 else j
                if self.quote != "`":
                    k = text.find("\\", i, j)
                    j = k if k >= 0 else j
                self.buf.append(text[i:j])
                if j >= n:
                    break
                if text[j] == "\\" and self.quote != "`":
                    if j + 1 >= n and not final:
                        self.tail = "\\"  # the escaped character is in the next chunk
                        break
                    self.buf.append(text[j:j + 2])
                    i = j + 2
                    continue
                self.buf.append(text[j])
                i = j + 1
                if text[j] == self.quote:
                    self.state = "code"
            elif self.state in ("line", "command"):
                j = text.find("\n", i)
                if j < 0:
                    self.comment.append(text[i:])
                    break
                self.comment.append(text[i:j])
                if self.state == "line" and "".join(self.comment).startswith(
                        FIX_BYTES_MARKER) and not self.started:
                    out.append(FIX_BYTES_MARKER)
                    self.lines.append(self._line_at(j))
                if self.state == "command":
                    self.commands.append(":" + "".join(self.comment).strip())
                self.state, self.comment = "code", []
                i = j + 1
            else:  # block comment
                j = text.find("*/", i)
                if j < 0:
                    if text.endswith("*") and not final:
                        self.tail = "*"
                    break
                self.state = "code"
                i = j + 2
        if self.size + sum(map(len, self.buf)) > MAX_STATEMENT:
            raise BadRequest(f"a Cypher statement longer than {MAX_STATEMENT >> 20} MiB (the "
                             "exporters write batches of 1000 rows)", code="invalid_backup")
        if final:
            if self.state == "line" and "".join(self.comment).startswith(FIX_BYTES_MARKER):
                out.append(FIX_BYTES_MARKER)
                self.lines.append(self._line_at(n))
            if self.state == "quote":
                raise BadRequest("the Cypher script ends inside a string (cut off)",
                                 code="invalid_backup")
            if self.state != "block":
                self._emit(out, n)
        self._line = self._line_at(n)  # a carried tail is "/", "*" or "\\": no newline
        return out


def split_statements(text: str) -> list[str]:
    splitter = StatementSplitter()
    return splitter.feed(text) + splitter.feed("", final=True)


_FIRST_WORDS = {"CREATE", "UNWIND", "MATCH", "MERGE", "WITH", "DROP", "OPTIONAL", "CALL"}
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`]|``)*`", re.S)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FORBIDDEN = {
    "LOAD": "LOAD CSV reads files and URLs",
    "USE": "USE switches to another database",
    "USER": "user administration", "USERS": "user administration",
    "ROLE": "role administration", "ROLES": "role administration",
    "DATABASE": "database administration", "DATABASES": "database administration",
    "ALIAS": "database administration", "COMPOSITE": "database administration",
    "GRANT": "privilege administration", "DENY": "privilege administration",
    "REVOKE": "privilege administration", "PRIVILEGES": "privilege administration",
    "SHOW": "SHOW commands", "TERMINATE": "TERMINATE commands",
    "ALTER": "ALTER commands",
    "SERVER": "server administration", "IMPORT": "CALL … IN TRANSACTIONS import clauses",
}
_ALLOWED_CALL = re.compile(r"(?i)^CALL\s+db\.awaitIndexes\s*\(\s*\d*\s*\)$")
_ALLOWED_COMMANDS = {":begin", ":commit", ":rollback"}


def _code(stmt: str) -> str:
    """The statement with string literals and quoted names blanked (`''` / ``` `` ```)."""
    return _QUOTED.sub(lambda m: m.group()[0] * 2, stmt)


# `apoc.x(…)`, `dbms.x(…)`, `` `apoc`.x(…) ``: the exporters call no namespaced function
_NAMESPACED_CALL = re.compile(r"(?:[A-Za-z_]\w*|``)(?:\s*\.\s*(?:[A-Za-z_]\w*|``))+\s*\(")
_DROP_OK = re.compile(r"(?i)\s*(INDEX|CONSTRAINT)\b")


def _neighbour(code: str, at: int, step: int) -> str:
    """The first non-space character before (`step` -1) or from (`step` 1) `at`, without
    copying the statement (it may be large)."""
    i = at - 1 if step < 0 else at
    while 0 <= i < len(code) and code[i].isspace():
        i += step
    return code[i] if 0 <= i < len(code) else ""


def check_statement(stmt: str) -> str | None:
    """Why `stmt` is refused, or None when it has a shape the exporters write."""
    if stmt == FIX_BYTES_MARKER:
        return None
    code = _code(stmt).strip()
    if _ALLOWED_CALL.match(code):
        return None
    first = _WORD.match(code)
    if first is None or first.group().upper() not in _FIRST_WORDS - {"CALL"}:
        return f"statement starts with {code[:30]!r}"
    if m := _NAMESPACED_CALL.search(code):
        return f"a namespaced function or procedure ({m.group().rstrip('( ')}…)"
    for m in _WORD.finditer(code):
        word = m.group()
        before, after = _neighbour(code, m.start(), -1), _neighbour(code, m.end(), 1)
        if (before in (":", ".", "$") or after == ":") and after not in (".", "("):
            continue  # a label, relationship type, property, parameter or map key
        upper = word.upper()
        if upper == "CALL":
            return "CALL of a procedure or subquery"
        if after == "." and word.lower() in ("apoc", "dbms", "db", "gds", "genai"):
            return f"{word}.* procedures and functions"
        if upper == "DROP" and not _DROP_OK.match(code, m.end()):
            return "DROP of something other than an index or constraint"
        if upper in _FORBIDDEN:
            return _FORBIDDEN[upper]
    return None


def check_command(command: str) -> str | None:
    word = command.split(None, 1)[0].lower() if command.strip() else ":"
    if word in _ALLOWED_COMMANDS:
        return None
    return f"cypher-shell command {command[:30]!r}"
