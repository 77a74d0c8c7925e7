"""A streaming guard for plain-SQL PostgreSQL scripts fed to psql.

A backup file is untrusted input. psql executes backslash meta-commands (`\\!`, `\\o |cmd`,
`\\copy … program`, `\\gexec`, `\\i`…) and the server honours transaction control found in
the script, so `PgScriptGuard` reads the script the way psql's lexer (psqlscan.l) and the
server's do — quotes, `E''` escapes, string continuation across newlines, dollar quotes,
nested comments, parenthesis depth, `BEGIN ATOMIC … END` bodies, `COPY … FROM stdin` data
blocks — and, outside string literals and COPY data:

- refuses every backslash meta-command except pg_dump's own `\\restrict KEY` /
  `\\unrestrict KEY` bracket, which it removes (Safehold runs psql under its own key);
- refuses transaction control (`COMMIT`, `ROLLBACK`, `END`, `PREPARE TRANSACTION`…):
  Safehold sends the only `BEGIN` and the only `COMMIT`; the bare `BEGIN;` / `COMMIT;`
  lines pg_dump writes around large objects are blanked;
- refuses `COPY` other than pg_dump's `COPY … FROM stdin;` (text format);
- refuses what would make psql and this guard read the text differently: a carriage
  return outside literals, psql variables (`:name`, `:'name'`), a dollar-quote opener
  glued to an identifier or number, a backslash before a quote in a standard string (its
  meaning flips with `standard_conforming_strings`), and `SET`/`set_config` of anything
  but the settings pg_dump writes (no multibyte client encoding whose second bytes can be
  a quote or backslash);
- refuses NUL bytes anywhere (psql silently drops the rest of a line after one);
- notes pg_dump's `dump complete` footer: `finish()` refuses a script without it.

`feed()` returns the bytes to hand to psql (line count unchanged, so psql's line numbers
are the file's). Used by upload validation and by every restore, so a file put into storage
by hand gets the same checks. COPY data passes through with C-speed scans only. A mismatch
with psql that slipped through anyway is caught by the restore itself: psql runs under
`\\restrict`, and Safehold commits only if its own transaction is still the one open.
"""

from __future__ import annotations

import re
from collections import Counter

from shared.errors import BadRequest
from shared.formats.pgtables import TableCut

FOOTER = b"-- PostgreSQL database dump complete"
MAX_LINE = 64 << 20  # a single line of SQL text (not COPY data) above this is refused
HEAD_MAX = 1 << 20  # unquoted text kept of one statement (its checks need the start)
CUT_OFF = "invalid_upload"  # an incomplete script: not hostile, just unusable

_NORMAL, _SQUOTE, _ESTRING, _DQUOTE, _DOLLAR, _COMMENT = range(6)
_SPECIAL = re.compile(rb"'|\"|\$(?:[A-Za-z_\x80-\xff][\w\x80-\xff]*)?\$|--|/\*|\\|;")
_IDENT_CHAR = re.compile(rb"[\w\x80-\xff$]")
_ESTRING_END = re.compile(rb"\\.|'", re.S)
_COMMENT_TOKENS = re.compile(rb"/\*|\*/")
_WORDS = re.compile(rb"[()]|[A-Za-z_\x80-\xff][\w\x80-\xff$]*")
_RESTRICT = re.compile(rb"\\(restrict|unrestrict)[ \t]+([A-Za-z0-9]+)[ \t]*\r?\n?$")
# pg_dump's shape exactly: text format, no options (binary or CSV data would not end where
# this guard thinks it does)
_COPY_STDIN = re.compile(rb"(?is)^\s*COPY\s+(?!BINARY\b)[^;]*?\sFROM\s+stdin\s*;$")
_TXN_CONTROL = re.compile(
    rb"(?i)^\s*(BEGIN|START|COMMIT|END|ROLLBACK|ABORT|PREPARE\s+TRANSACTION)\b")
_BLANKED = {b"BEGIN;", b"COMMIT;"}
# what a dump of one database never holds: statements about the whole server (roles and
# memberships, databases, tablespaces, server settings); run by a superuser they would
# reach beyond the database restored
_SERVER_WIDE = re.compile(
    rb"(?i)^\s*(?:(?:CREATE|ALTER|DROP)\s+(?:ROLE|USER(?!\s+MAPPING)|GROUP|DATABASE|"
    rb"TABLESPACE)\b|ALTER\s+SYSTEM\b|(?:REASSIGN|DROP)\s+OWNED\b|LOAD\b|CHECKPOINT\b|"
    rb"GRANT\s(?:(?!\sON\s).)*\sTO\s)", re.S)
# what pg_dump SETs (and set_config's); values are free but for these two
SETTINGS = frozenset({
    b"statement_timeout", b"lock_timeout", b"idle_in_transaction_session_timeout",
    b"transaction_timeout", b"client_encoding", b"standard_conforming_strings",
    b"check_function_bodies", b"xmloption", b"client_min_messages", b"row_security",
    b"default_tablespace", b"default_table_access_method", b"default_with_oids",
    b"search_path", b"session_replication_role", b"synchronous_commit", b"role",
    b"session", b"time", b"timezone", b"datestyle", b"intervalstyle", b"extra_float_digits",
})
# client-only encodings whose second byte may be a quote or backslash in ASCII
RISKY_ENCODINGS = frozenset({b"sjis", b"shift_jis", b"big5", b"gbk", b"uhc", b"gb18030",
                             b"johab", b"win932", b"win936", b"win949", b"win950",
                             b"cp932", b"cp936", b"cp949", b"cp950"})
_SET = re.compile(rb"(?is)^\s*(?:SET|RESET)\s+(?:(?:SESSION|LOCAL)\s+)?([A-Za-z_.&\x80-\xff]+)"
                  rb"(?:\s*(?:=|\s+TO\s+)\s*(.*?))?\s*;$")
_SET_CONFIG = re.compile(rb"(?i)set_config\s*\(\s*'([A-Za-z_.]+)'\s*,\s*'([^']*)'")
_PSQL_VARIABLE = re.compile(rb"(?<!:):(?=[A-Za-z_\x80-\xff{])")
_COPY_ENDS = (b"\\.\n", b"\\.\r\n")  # a COPY data line that ends the data (psql's rule)
# psqlscan.l: inside CREATE [OR REPLACE] FUNCTION|PROCEDURE, BEGIN/CASE … END nest and a
# `;` in between does not end the statement (SQL-standard `BEGIN ATOMIC` bodies)
_ROUTINE_WORDS = {b"create": b"c", b"function": b"f", b"procedure": b"p", b"or": b"o",
                  b"replace": b"r"}


class UnsafeScript(BadRequest):
    """A script holds something Safehold never feeds to psql; names the line."""

    code = "unsafe_backup"

    def __init__(self, line: int, what: str, *, code: str | None = None) -> None:
        super().__init__(f"line {line}: {what}; refused, nothing was executed", code=code)
        self.line = line
        self.details = {"line": line}


def _show(text: bytes, limit: int = 60) -> str:
    shown = text.strip().decode("utf-8", "replace")
    return shown if len(shown) <= limit else shown[:limit] + "…"


# owners and grants as pg_dump writes them: one statement on one line
_PRIVILEGES = re.compile(rb"(?is)^(?:GRANT\s|REVOKE\s|ALTER\s+DEFAULT\s+PRIVILEGES\s|"
                         rb"ALTER\s+\S.*\sOWNER\s+TO\s)")
_PLAIN_STATEMENT = re.compile(rb"^[^'$;\\]*;$")  # no literal, comment start or second `;`
_IDENT = rb'(?:[A-Za-z_\x80-\xff][\w$\x80-\xff]*|"(?:[^"]|"")+")'
# the role list after TO / FROM / OWNER TO / FOR ROLE (where a statement names roles)
_ROLE_LIST = re.compile(rb"(?i)(\b(?:TO|FROM|FOR\s+ROLE)\s+)(" + _IDENT +
                        rb"(?:\s*,\s*" + _IDENT + rb")*)")
_POLICY = re.compile(rb"(?is)^CREATE\s+POLICY\s")
_POLICY_BODY = re.compile(rb"(?i)\s(?:USING|WITH\s+CHECK)\s*\(")


def quote_ident(name: str) -> bytes:
    """`name` as PostgreSQL prints an identifier (quoted unless plain lowercase)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name.encode()
    return b'"' + name.replace('"', '""').encode() + b'"'


def _unquote(token: bytes) -> str:
    t = token.decode("utf-8", "replace")
    return t[1:-1].replace('""', '"') if t.startswith('"') else t.lower()


def map_roles(statement: bytes, role_map: dict[str, str]) -> bytes:
    """The statement with the roles it grants to, revokes from or gives ownership to
    renamed by `role_map` (only in those positions: a table or schema that happens to
    carry a role's name keeps it)."""
    def one_list(m: re.Match[bytes]) -> bytes:
        names = re.findall(_IDENT, m.group(2))
        mapped = [quote_ident(role_map[_unquote(n)]) if _unquote(n) in role_map else n
                  for n in names]
        return m.group(1) + b", ".join(mapped)
    return _ROLE_LIST.sub(one_list, statement)


class PgScriptGuard:
    def __init__(self, *, skip_privileges: bool = False,
                 role_map: dict[str, str] | None = None, cut: TableCut | None = None
                 ) -> None:
        # `tables` restores: only the sections of those tables go on (pgtables)
        self.cut = cut
        # roles = "skip": owners and grants are left out (and listed in `skipped`)
        self.skip_privileges = skip_privileges
        self.skipped: list[str] = []
        # roles = "map": the roles owners, grants and policies name are renamed
        self.role_map = role_map or {}
        self.mapped = 0
        self.line = 0  # complete lines seen
        self.footer = False
        self.restrict_key: bytes | None = None
        self.counts: Counter[str] = Counter()  # statement kinds worth reporting
        self._mode = _NORMAL
        self._tag = b""
        self._depth = 0  # nested block comments
        self._cont: int | None = None  # a string just closed: may continue after a newline
        self._cont_nl = False
        self._parts: list[bytes] = []  # the current partial line (SQL text mode)
        self._partial = 0
        self._head = bytearray()  # the current statement's unquoted text, capped
        self._head_full = False
        self._in_statement = False
        self._parens = 0
        self._begins = 0
        self._words: list[bytes] = []  # the statement's first four words, routine-marked
        self._word_count = 0
        self._copy = False
        self._hold = b""  # COPY mode: the start of a line that may be "\." cut by the chunk
        self._bol = True  # COPY mode: the next byte starts a line
        self._any_sql = False
        self._set_config_seen = False
        self._raw_set = False  # the current SET statement was checked on its raw line
        self._line_dirty = False  # the current line has held code, a quote or a comment
        self._stmt_comment = False  # the current statement holds a comment

    # ------------------------------------------------------------------ streaming
    def feed(self, data: bytes) -> bytes:
        if self._hold:
            data, self._hold = self._hold + data, b""
        nul = data.find(b"\0")
        if nul >= 0:
            self._refuse_nul(data, nul)
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            if self._copy:
                pos = self._feed_copy(data, pos, out)
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._parts.append(data[pos:])
                self._partial += len(data) - pos
                if self._partial > MAX_LINE:
                    raise UnsafeScript(self.line + 1, "a line of SQL longer than "
                                       f"{MAX_LINE >> 20} MiB")
                break
            piece = data[pos:nl + 1]
            if self._parts:
                self._parts.append(piece)
                piece = b"".join(self._parts)
                self._parts, self._partial = [], 0
            pos = nl + 1
            self.line += 1
            out.append(self._sql_line(piece))
        return b"".join(out)

    def finish(self) -> bytes:
        """The last (unterminated) line; raises unless the script ended cleanly."""
        out = b""
        if self._copy:
            raise UnsafeScript(self.line + 1, "the script ends inside COPY data (cut off)",
                               code=CUT_OFF)
        if self._parts:
            piece = b"".join(self._parts)
            self._parts = []
            self.line += 1
            out = self._sql_line(piece)
        if self._mode != _NORMAL:
            raise UnsafeScript(self.line, "the script ends inside a quoted string or "
                               "comment (cut off)", code=CUT_OFF)
        if self._in_statement:
            raise UnsafeScript(self.line, "the script ends inside a statement (cut off, or "
                               "unbalanced parentheses)", code=CUT_OFF)
        if not self.footer:
            raise UnsafeScript(self.line, "no '-- PostgreSQL database dump complete' footer: "
                               "the dump was cut off", code=CUT_OFF)
        if self.cut is not None:
            self.cut.finish()
            out = self.cut.route(out)
        return out

    def _refuse_nul(self, data: bytes, at: int) -> None:
        before = b"".join(self._parts) + data[:at] if not self._copy else data[:at]
        raise UnsafeScript(self.line + before.count(b"\n") + 1,
                           "a NUL byte (psql would silently drop the rest of the line)")

    # ------------------------------------------------------------------ COPY data
    def _feed_copy(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Pass COPY data through up to and including its `\\.` line; return where SQL
        starts again (or len(data)). Candidates are found with `find`, never by slicing
        the rest of the chunk, so many small COPY blocks in a chunk stay linear."""
        n = len(data)
        cand = pos if self._bol else self._next_line_start(data, pos)
        while cand >= 0:
            end = self._copy_end(data, cand)
            if end > 0:
                self._emit_copy(data, pos, end, out)
                self._copy, self._bol = False, True
                return end
            if end == -2:  # "\", "\." or "\.\r" cut by the chunk: decide with the next
                self._emit_copy(data, pos, cand, out)
                self._hold, self._bol = data[cand:], True
                return n
            cand = self._next_line_start(data, cand)
        self._emit_copy(data, pos, n, out)
        if n > pos:
            self._bol = data.endswith(b"\n")
        return n

    @staticmethod
    def _next_line_start(data: bytes, at: int) -> int:
        """The next line start after `at` that begins with a backslash, or -1."""
        j = data.find(b"\n\\", at)
        return -1 if j < 0 else j + 1

    @staticmethod
    def _copy_end(data: bytes, at: int) -> int:
        """End of a terminator line starting at `at`; -1 if none; -2 if undecidable yet."""
        seg = data[at:at + 4]
        for term in _COPY_ENDS:
            if seg.startswith(term):
                return at + len(term)
        if at + 4 > len(data) and any(t.startswith(seg) for t in _COPY_ENDS):
            return -2
        return -1

    def _emit_copy(self, data: bytes, start: int, end: int, out: list[bytes]) -> None:
        if end > start:
            piece = data[start:end]
            self.line += piece.count(b"\n")
            if self.cut is not None:
                piece = self.cut.copy_data(piece)
            out.append(piece)

    # ------------------------------------------------------------------ SQL text
    def _sql_line(self, line: bytes) -> bytes:
        body = line.rstrip(b"\r\n")
        between = self._mode == _NORMAL and not self._in_statement and self._cont is None
        self._line_dirty = not between  # what a statement starting here follows on its line
        if self.cut is not None:
            self.cut.line_start(between, self.line)
            if between and body.startswith(b"-- "):
                self.cut.header(body.strip())
            self.cut.capture(line)
        if between:
            stripped = body.strip()
            if m := _SET.match(stripped):  # a SET's value may be a literal: check it raw
                self._check_setting(m.group(1).lower(), m.group(2) or b"")
                self._raw_set = True
            if stripped in _BLANKED:
                return b"\n"  # pg_dump's large-object BEGIN/COMMIT: Safehold's transaction
            if self.skip_privileges and _PRIVILEGES.match(stripped) and \
                    _PLAIN_STATEMENT.match(stripped) and b"--" not in stripped and \
                    b"/*" not in stripped:
                self.skipped.append(stripped.decode("utf-8", "replace")[:300])
                return b"\n"
            if self.role_map and stripped.endswith(b";") and (
                    (_PRIVILEGES.match(stripped) and _PLAIN_STATEMENT.match(stripped)
                     and b"--" not in stripped and b"/*" not in stripped)
                    or _POLICY.match(stripped)):
                line = self._mapped(line)
            if stripped == FOOTER:
                self.footer = True
                return line
            m = _RESTRICT.match(stripped)
            if m and body.startswith(b"\\"):
                return self._restrict_line(m.group(1), m.group(2))
        self._set_config_seen = False
        copy_after = self._lex(body)
        if self._set_config_seen:
            self._check_set_config(body)
        if self._cont is not None:
            self._cont_nl = True  # a newline passed after a closed string
        if copy_after:
            self._copy, self._bol, self._hold = True, True, b""
        return line if self.cut is None else self.cut.route(line)

    def _mapped(self, line: bytes) -> bytes:
        """A privilege statement, or a policy's head (before USING / WITH CHECK: the rest
        holds expressions and literals), with its roles renamed."""
        cut = _POLICY_BODY.search(line) if _POLICY.match(line.strip()) else None
        head, tail = (line[:cut.start()], line[cut.start():]) if cut else (line, b"")
        if b"'" in head or b"$" in head or b"--" in head or b"/*" in head:
            return line  # not plain enough to rewrite safely: left as it is
        new = map_roles(head, self.role_map) + tail
        if new != line:
            self.mapped += 1
        return new

    def _check_set_config(self, body: bytes) -> None:
        """set_config outside literals: only with a literal name pg_dump uses (a computed
        name could turn standard_conforming_strings off or pick a risky encoding)."""
        calls = body.lower().count(b"set_config")
        found = _SET_CONFIG.findall(body)
        if len(found) < calls:
            raise UnsafeScript(self.line, "set_config without a literal setting name")
        for name, value in found:
            self._check_setting(name.lower(), value)

    def _check_setting(self, name: bytes, value: bytes) -> None:
        value = value.strip().strip(b"'\"").lower()
        if name not in SETTINGS:
            raise UnsafeScript(self.line, f"setting {name.decode('utf-8', 'replace')!r} "
                               "(only the settings pg_dump writes are accepted)")
        if name == b"standard_conforming_strings" and value not in (b"on", b"true", b""):
            raise UnsafeScript(self.line, "standard_conforming_strings other than on (it "
                               "changes what a backslash in a string means)")
        if name == b"client_encoding" and value.replace(b"-", b"_") in RISKY_ENCODINGS:
            raise UnsafeScript(self.line, f"client encoding {value.decode()!r} (its second "
                               "bytes can look like quotes or backslashes)")

    def _restrict_line(self, verb: bytes, key: bytes) -> bytes:
        if verb == b"restrict" and self.restrict_key is None and not self._any_sql:
            self.restrict_key = key
            return b"\n"
        if verb == b"unrestrict" and key == self.restrict_key:
            return b"\n"
        raise UnsafeScript(self.line, f"psql meta-command \\{verb.decode()} out of place "
                           "(only pg_dump's own opening \\restrict and matching "
                           "\\unrestrict are accepted)")

    def _lex(self, s: bytes) -> bool:
        """Advance the lexer over one line; True when COPY data starts on the next line."""
        i, n = 0, len(s)
        while i < n:
            mode = self._mode
            if mode == _NORMAL:
                if self._cont is not None:
                    i = self._after_string(s, i)
                    if self._mode != _NORMAL or i >= n:
                        continue
                m = _SPECIAL.search(s, i)
                stop = m.start() if m else n
                self._text(s[i:stop])
                if m is None:
                    break
                tok = m.group()
                i = m.end()
                if tok in (b"'", b'"') and stop > 0 and s[stop - 1:stop] == b":" \
                        and s[stop - 2:stop - 1] != b":":
                    raise UnsafeScript(self.line, "a psql variable reference (:'name')")
                if tok == b"'":
                    self._start_statement()
                    e = stop - 1
                    self._mode = _ESTRING if (
                        e >= 0 and s[e:e + 1] in (b"E", b"e")
                        and (e == 0 or not _IDENT_CHAR.match(s, e - 1))) else _SQUOTE
                    self._text(b" ")
                elif tok == b'"':
                    self._start_statement()
                    self._mode = _DQUOTE
                    self._head_add(b"X")
                elif tok.startswith(b"$"):
                    if stop > 0 and (_IDENT_CHAR.match(s, stop - 1) or s[stop - 1:stop] == b":"):
                        raise UnsafeScript(self.line, f"{_show(s[max(0, stop - 10):i])!r}: a "
                                           "dollar sign glued to a name or number (pg_dump "
                                           "quotes such names; psql may read a dollar quote)")
                    self._start_statement()
                    self._mode, self._tag = _DOLLAR, tok
                    self._text(b" ")
                elif tok == b"--":
                    self._commented()
                    if b"\r" in s[i:]:
                        raise UnsafeScript(self.line, "a carriage return inside a comment "
                                           "(psql ends the comment there)")
                    break  # comment to the end of the line
                elif tok == b"/*":
                    self._commented()
                    self._mode, self._depth = _COMMENT, 1
                elif tok == b"\\":
                    raise UnsafeScript(self.line, "psql meta-command "
                                       f"{_show(s[stop:stop + 20], 20)!r} (backslash commands "
                                       "run on the restoring host, never from a backup)")
                elif self._parens or self._begins:  # ";" inside ( … ) or BEGIN … END
                    self._head_add(b";")
                elif self._end_statement():
                    if s[i:].strip():
                        raise UnsafeScript(self.line, "text after COPY … FROM stdin; on "
                                           "the same line")
                    return True
            elif mode == _SQUOTE or mode == _DQUOTE:
                q = b"'" if mode == _SQUOTE else b'"'
                j = s.find(q, i)
                if j < 0:
                    break
                if mode == _SQUOTE and _odd_backslashes(s, i, j):
                    raise UnsafeScript(self.line, "a backslash before a quote in a string "
                                       "(where the string ends depends on "
                                       "standard_conforming_strings); write it as E'…'")
                if s[j + 1:j + 2] == q:
                    i = j + 2
                    continue
                self._close_quote(mode)
                i = j + 1
            elif mode == _ESTRING:
                m = _ESTRING_END.search(s, i)
                if m is None:
                    break
                i = m.end()
                if m.group() == b"'":
                    if s[i:i + 1] == b"'":
                        i += 1
                        continue
                    self._close_quote(mode)
            elif mode == _DOLLAR:
                j = s.find(self._tag, i)
                if j < 0:
                    break
                self._mode, i = _NORMAL, j + len(self._tag)
            else:  # block comment, nesting
                m = _COMMENT_TOKENS.search(s, i)
                if m is None:
                    break
                i = m.end()
                self._depth += 1 if m.group() == b"/*" else -1
                if self._depth == 0:
                    self._mode = _NORMAL
        if self._mode == _NORMAL:
            self._text(b" ")
        return False

    def _commented(self) -> None:
        self._line_dirty = True
        if self._in_statement:
            self._stmt_comment = True

    def _close_quote(self, mode: int) -> None:
        self._mode = _NORMAL
        if mode != _DQUOTE:  # 'a'<newline>'b' is one string, with the first one's escapes
            self._cont, self._cont_nl = mode, False

    def _after_string(self, s: bytes, i: int) -> int:
        """Right after a string literal: whitespace, `--` comments, then a quote after a
        newline continues the same string (the server's and psql's `quotecontinue`)."""
        n = len(s)
        while i < n and s[i:i + 1] in b" \t\f\v":
            i += 1
        if s[i:i + 1] == b"\r":  # psql and the server read it as a line break
            raise UnsafeScript(self.line, "a carriage return inside a line (psql reads it as "
                               "a line break)")
        if i >= n:
            return n  # the line ends: a newline follows
        if s.startswith(b"--", i):  # a comment runs to the line's end, as psql reads it
            if b"\r" in s[i:]:
                raise UnsafeScript(self.line, "a carriage return inside a comment (psql ends "
                                   "the comment there)")
            self._commented()
            return n
        if s[i:i + 1] == b"'" and self._cont_nl and self._cont is not None:
            if self._cont == _ESTRING:  # the server continues E'' escapes, psql does not
                raise UnsafeScript(self.line, "an E'' string continued on the next line "
                                   "(psql and the server read it differently)")
            self._mode = self._cont
            i += 1
        self._cont = None
        return i

    def _text(self, t: bytes) -> None:
        if b"\r" in t:
            raise UnsafeScript(self.line, "a carriage return inside a line (psql reads it as "
                               "a line break)")
        if _PSQL_VARIABLE.search(t):
            raise UnsafeScript(self.line, f"a psql variable reference in {_show(t, 40)!r}")
        if not t or (not self._in_statement and not t.strip()):
            return
        self._start_statement()
        self._head_add(t)
        if t.strip():
            self._line_dirty = True
        for m in _WORDS.finditer(t):
            self._word(m.group())

    def _head_add(self, t: bytes) -> None:
        room = HEAD_MAX - len(self._head)
        if len(t) > room:
            self._head_full = True
        self._head += t[:room]

    def _word(self, w: bytes) -> None:
        """psqlscan.l's paren depth and BEGIN … END depth inside routine definitions."""
        if w == b"(":
            self._parens += 1
            return
        if w == b")":
            self._parens = max(0, self._parens - 1)
            return
        low = w.lower()
        if low == b"set_config":
            self._set_config_seen = True
        if self._word_count < 4:
            self._words.append(_ROUTINE_WORDS.get(low, b"-"))
        self._word_count += 1
        first = b"".join(self._words)
        if not (first[:2] in (b"cf", b"cp") or first[:4] in (b"corf", b"corp")) \
                or self._parens:
            return
        if low == b"begin":
            self._begins += 1
        elif low == b"case" and self._begins:
            self._begins += 1
        elif low == b"end" and self._begins:
            self._begins -= 1

    def _start_statement(self) -> None:
        if not self._in_statement:
            if self.cut is not None:
                self.cut.statement_start(first_on_line=not self._line_dirty)
            self._stmt_comment = False
            self._in_statement = True
            self._any_sql = True
            self._head.clear()
            self._head_full = False
            self._parens = self._begins = self._word_count = 0
            self._words = []

    def _end_statement(self) -> bool:
        """A `;` that ends a statement: check it; True if it was COPY … FROM stdin."""
        head = bytes(self._head) + b";"
        full = self._head_full
        self._in_statement = False
        self._head.clear()
        if _TXN_CONTROL.match(head):
            raise UnsafeScript(self.line, f"transaction control {_show(head)!r} (Safehold "
                               "runs the whole restore as one transaction it commits itself)")
        if _SERVER_WIDE.match(head):
            raise UnsafeScript(self.line, f"{_show(head)!r}: a statement about the whole "
                               "server (roles, memberships, databases, tablespaces, server "
                               "settings), which a backup of one database never holds")
        raw_checked, self._raw_set = self._raw_set, False
        if m := _SET.match(head):
            name = m.group(1).lower()
            self._check_setting(name, m.group(2) or b"")
            if name in (b"client_encoding", b"standard_conforming_strings") and not raw_checked:
                raise UnsafeScript(self.line, f"SET {name.decode()} over several lines")
        elif re.match(rb"(?i)\s*(SET|RESET)\b", head):
            raise UnsafeScript(self.line, f"{_show(head)!r}: a SET pg_dump does not write")
        if self.cut is not None:
            self.cut.statement(head, self._stmt_comment)
        word = head.split(None, 2)
        kind = b" ".join(w.upper() for w in word[:2]).decode("ascii", "replace")
        if kind in ("CREATE SUBSCRIPTION", "CREATE PUBLICATION", "CREATE EXTENSION"):
            self.counts[kind] += 1
        if word and word[0].upper().startswith(b"COPY"):
            if full or not _COPY_STDIN.match(head):
                raise UnsafeScript(self.line, f"{_show(head)!r}: only COPY … FROM stdin in "
                                   "text format is accepted (no server files or programs)")
            return True
        return False


def _odd_backslashes(s: bytes, start: int, at: int) -> bool:
    """An odd run of backslashes right before s[at] (within s[start:at])."""
    k = at - 1
    while k >= start and s[k:k + 1] == b"\\":
        k -= 1
    return (at - 1 - k) % 2 == 1
