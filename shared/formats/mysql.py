"""MySQL/MariaDB dumps: only what mysqldump/mariadb-dump write, split as the server splits."""

from __future__ import annotations

import re
from collections.abc import Iterator

from shared.errors import BadRequest
from shared.formats.common import FileFacts, Unsafe
from shared.formats.mysqlscan import HEAD as HEAD_MYSQL
from shared.formats.mysqlscan import StatementStarts

_MY_HEADERS = (b"-- MariaDB dump", b"-- MySQL dump")
_MY_FOOTER = b"-- Dump completed"
HEADER_WITHIN = 64 << 20  # the accounts head (worker.engines.globals_head) is at most this
# client commands the mysql/mariadb client runs from its input: backslash commands anywhere
# outside statements, long forms at the start of a line (mysqldump escapes newlines inside
# string data, so a raw line start is never data)
# anchored on a literal newline (the scan skips to each line start at C speed); the text
# scanned always begins at a line start, so a newline is put in front of it
_MY_COMMAND = re.compile(
    rb"\n[ \t]*(\\[^\n]|(?i:system|source|tee|notee|pager|nopager|connect|edit|"
    rb"charset|prompt|rehash|warnings|nowarning|print|status|exit|quit|go|ego|help|"
    rb"resetconnection|query_attributes)(?=[ \t;\r\n]))")
_MY_LOCAL = re.compile(rb"(?i)\bLOAD\s+(?:DATA|XML)\s+(?:LOW_PRIORITY\s+|CONCURRENT\s+)?LOCAL\b")
# statements that would leave the target database or administer the server (also inside a
# `/*!50000 … */` executable comment, which the server runs): mysqldump writes none of them
# (`--databases` dumps carry USE / CREATE DATABASE: restore those into the named database's
# own target); statements start at line starts in a dump
_MY_ELSEWHERE = re.compile(
    rb"\n[ \t]*(?:/\*[!M]!?\d*\s*)?((?i:USE|CREATE\s+(?:DATABASE|SCHEMA|USER|SERVER)|"
    rb"DROP\s+(?:DATABASE|SCHEMA|"
    rb"USER|SERVER)|ALTER\s+(?:DATABASE|SCHEMA|USER|SERVER|INSTANCE)|RENAME\s+USER|GRANT|"
    rb"REVOKE|SET\s+PASSWORD|INSTALL\s+(?:PLUGIN|SONAME)|UNINSTALL|SHUTDOWN|KILL|"
    rb"CHANGE\s+(?:MASTER|REPLICATION)|START\s+SLAVE|STOP\s+SLAVE|RESET\s+(?:MASTER|SLAVE)|"
    rb"PURGE|FLUSH)\b)")
# the same, at the start of every statement as the client splits them (shared/formats/mysqlscan):
# `SELECT 1; GRANT …` on one line; also what runs stored or dynamic code, and settings
# beyond the session — mysqldump writes none of them outside routine bodies
_MY_STATEMENT = re.compile(
    rb"(?is)(?:USE|CREATE\s+(?:DATABASE|SCHEMA|USER|SERVER|ROLE)|"
    rb"DROP\s+(?:DATABASE|SCHEMA|USER|SERVER|ROLE)|"
    rb"ALTER\s+(?:DATABASE|SCHEMA|USER|SERVER|INSTANCE)|RENAME\s+USER|GRANT|REVOKE|"
    rb"SET\s+(?:PASSWORD|ROLE|DEFAULT\s+ROLE|GLOBAL|PERSIST|@@GLOBAL|@@PERSIST)|"
    rb"INSTALL|UNINSTALL|SHUTDOWN|KILL|CHANGE\s+(?:MASTER|REPLICATION)|"
    rb"(?:START|STOP)\s+(?:ALL\s+)?(?:SLAVE|REPLICA)|RESET\s+(?:MASTER|SLAVE|REPLICA)|"
    rb"PURGE|FLUSH|BINLOG|PREPARE|EXECUTE|CALL|HANDLER|CACHE\s+INDEX|"
    rb"LOAD\s+(?:DATA|XML|INDEX))\b")
# what mysqldump/mariadb-dump write as statements, and nothing else (a deny-list of what
# reaches beyond the database is always one form short: `CREATE OR REPLACE USER`,
# `CREATE/**/USER`, `BEGIN NOT ATOMIC …`, `SET STATEMENT … FOR GRANT`). Matched on the
# statement's start with comments and executable-comment markers taken out.
_IDENT = rb"(?:`(?:[^`]|``)+`|[\w$]+)"
_DEFINER = rb"(?:DEFINER\s*=\s*(?:" + _IDENT + rb"|'[^']*')\s*@\s*(?:" + _IDENT + \
    rb"|'[^']*')\s+)?"
_MY_ALLOWED = re.compile(
    rb"(?is)(?:"
    rb"CREATE\s+(?:OR\s+REPLACE\s+)?(?:TEMPORARY\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    + _IDENT + rb"\s*[(\s]|"
    rb"CREATE\s+(?:OR\s+REPLACE\s+)?(?:ALGORITHM\s*=\s*\w+\s+)?" + _DEFINER +
    rb"(?:SQL\s+SECURITY\s+\w+\s+)?VIEW\s+" + _IDENT + rb"\s|"
    rb"CREATE\s+" + _DEFINER + rb"(?:PROCEDURE|FUNCTION|TRIGGER|EVENT)\s+" + _IDENT +
    rb"\s*[(\s]|"
    rb"CREATE\s+SEQUENCE\s+" + _IDENT + rb"\s|"
    rb"DROP\s+(?:TABLE|VIEW|PROCEDURE|FUNCTION|TRIGGER|EVENT|SEQUENCE)\s+IF\s+EXISTS\s+"
    + _IDENT + rb"\s*(?:,\s*" + _IDENT + rb"\s*)*$|"
    rb"(?:INSERT|REPLACE)\s+(?:IGNORE\s+)?INTO\s+" + _IDENT + rb"\s*[(\sV]|"
    rb"LOCK\s+TABLES\s+" + _IDENT + rb"\s+(?:READ|WRITE)|UNLOCK\s+TABLES\s*$|"
    rb"ALTER\s+TABLE\s+" + _IDENT + rb"\s+(?:DISABLE|ENABLE)\s+KEYS\s*$|"
    rb"(?:SELECT|DO)\s+SETVAL\s*\(\s*" + _IDENT + rb"\s*,|"
    rb"SET\s|COMMIT\s*$|START\s+TRANSACTION\s*$)")
_OPEN_ENDED = re.compile(
    rb"(?is)(?:(?:INSERT|REPLACE)\s+(?:IGNORE\s+)?INTO\s|CREATE\s+(?:OR\s+REPLACE\s+)?"
    rb"(?:TEMPORARY\s+)?TABLE\s|CREATE\s+(?:OR\s+REPLACE\s+)?(?:ALGORITHM\s*=\s*\w+\s+)?"
    + _DEFINER + rb"(?:SQL\s+SECURITY\s+\w+\s+)?(?:VIEW|PROCEDURE|FUNCTION|TRIGGER|EVENT)\s)")
_MY_TRIGGER_ON = re.compile(rb"(?is)CREATE\s+" + _DEFINER + rb"TRIGGER\s+" + _IDENT +
                            rb"\s+(?:BEFORE|AFTER)\s+\w+\s+ON\s+(" + _IDENT + rb")")
_MY_INSERT_INTO = re.compile(rb"(?is)(?:INSERT|REPLACE)\s+(?:IGNORE\s+)?INTO\s+(" + _IDENT +
                             rb")")


def _unquoted(ident: bytes) -> bytes:
    return (ident[1:-1].replace(b"``", b"`") if ident.startswith(b"`") else ident).lower()


_INNER_COMMENT = re.compile(rb"/\*(?![!M])(?:[^*]|\*(?!/))*\*/|/\*M?!\d*|\*/")


def _normalized(head: bytes) -> bytes:
    """A statement's start without comments and executable-comment markers, blanks
    collapsed (`CREATE/**/USER` is `CREATE USER`)."""
    return re.sub(rb"\s+", b" ", _INNER_COMMENT.sub(b" ", head)).strip()


# a table of a system database named in a statement (the restore user is often root)
_MY_SYSTEM_SCHEMA = re.compile(
    rb"(?i)(?<![\w$`])`?(?:mysql|sys|performance_schema|information_schema)`?\s*\.\s*[`\w]")
# the settings that change how the server reads the rest (string escapes, quotes, the
# client character set): only the values mysqldump writes, or a saved value put back
_MY_SETTING = re.compile(rb"(?i)\b(?:sql_mode|character_set_\w+|collation_connection|names|"
                         rb"character\s+set|charset)\b")
_MY_ASSIGNMENT = re.compile(
    rb"(?is)\s*(?:(@@(?:session\.|local\.)?|(?:session|local)\s+)|(@))?([\w$]+)\s*:?=\s*"
    rb"('(?:[^'\\]|\\.|'')*'|@@?[\w$.]+|[\w$]+)\s*")
_MY_NAMES = re.compile(rb"(?is)\s*(?:names|character\s+set|charset)\s+'?([\w$]+)'?"
                       rb"(?:\s+collate\s+'?([\w$]+)'?)?\s*")
_SAFE_CHARSETS = re.compile(rb"(?i)(?:utf8mb4|utf8mb3|utf8|latin1|ascii|binary)(?:_\w+)?")
_SAVED = {b"old_sql_mode", b"saved_sql_mode", b"old_character_set_client",
          b"old_character_set_results", b"old_collation_connection", b"saved_cs_client",
          b"saved_cs_results", b"saved_col_connection"}


def _setting_refused(head: bytes) -> str | None:
    """Why a SET statement's settings are not what mysqldump writes, or None."""
    text = head.rstrip().removesuffix(b"*/").rstrip()
    if not re.match(rb"(?i)SET\b", text):
        return None
    body = _normalized(text)[3:]
    if re.match(rb"(?i)\s*STATEMENT\b", body):
        return "SET STATEMENT (a statement inside a SET)"
    if not _MY_SETTING.search(text) and not re.search(rb"@(?!@)", text):
        return None  # settings that do not change how text is read
    if len(head) >= 256:
        return "a long SET of the session's reading settings"
    body = text[3:]
    # the assignments, split at commas outside quotes (a quoted sql_mode holds commas)
    items = re.split(rb",(?=(?:[^']*'[^']*')*[^']*$)", body)
    for item in items:
        if m := _MY_NAMES.fullmatch(item):
            if not all(_SAFE_CHARSETS.fullmatch(v) for v in m.groups() if v):
                return "a character set mysqldump does not write"
            continue
        m = _MY_ASSIGNMENT.fullmatch(item)
        if m is None:
            if _MY_SETTING.search(item) or b"@" in item:
                return "a SET it cannot read"
            continue
        user, name, value = m.group(2), m.group(3).lower(), m.group(4)
        if user:
            if name in _SAVED and not value.startswith(b"@@"):
                return f"@{name.decode()} set to something else than the server's setting"
            continue
        saved = value.startswith(b"@") and not value.startswith(b"@@") and \
            value[1:].lower() in _SAVED
        if name == b"sql_mode":
            if not (saved or (value.startswith(b"'") and not re.search(
                    rb"(?i)no_backslash_escapes|ansi_quotes|ansi\b", value))):
                return "an sql_mode mysqldump does not write"
        elif name.startswith(b"character_set_") or name == b"collation_connection":
            if not (saved or _SAFE_CHARSETS.fullmatch(value.strip(b"'"))):
                return "a character set mysqldump does not write"
    return None


_MY_FILE_WORDS = (b"outfile", b"dumpfile", b"load_file", b"infile")
_MY_FILES = re.compile(rb"(?i)\bINTO\s+(?:OUTFILE|DUMPFILE)\b|\bLOAD_FILE\s*\(|"
                       rb"\bLOAD\s+(?:DATA|XML)\b")
_CARRY = 64  # an open line's start is rescanned with the next chunk up to this length


class MySQLScriptCheck:
    """Line-start scan of a mysqldump/mariadb-dump script for client commands (the
    restore also runs the client with --binary-mode, --sandbox and --local-infile=0)."""

    def __init__(self) -> None:
        self.line = 1  # the line the next byte belongs to
        self.open_len = 0  # length of the open (unterminated) line so far
        self.carry = b""  # that open line, while it is short enough to rescan
        self.head = b""
        self.header_seen = False
        self.tail = b""
        self.size = 0
        self.statements = StatementStarts(self._statement)
        self.triggered: set[bytes] = set()  # tables with a trigger created so far

    def feed(self, chunk: bytes) -> None:
        if (nul := chunk.find(b"\0")) >= 0:
            line = self.line + chunk.count(b"\n", 0, nul)
            raise Unsafe(f"line {line}: a NUL byte in SQL text")
        self.size += len(chunk)
        if not self.header_seen and self.size - len(chunk) < HEADER_WITHIN:
            # the tool's header, after the accounts Safehold may put first ('-- G' lines)
            window = self.head + chunk
            self.header_seen = any(h in window for h in _MY_HEADERS)
            self.head = window[-32:]
        self.tail = (self.tail + chunk)[-4096:]
        self._check_local(chunk)
        try:
            self.statements.feed(chunk)
        except ValueError as exc:
            raise Unsafe(f"line {self.statements.line}: {exc}") from None
        if self.open_len > len(self.carry):  # the open line's start was checked already
            nl = chunk.find(b"\n")
            if nl < 0:
                self.open_len += len(chunk)
                return
            self.line += 1
            text = chunk[nl + 1:]
        else:
            text = self.carry + chunk
        probe = b"\n" + text
        if m := _MY_COMMAND.search(probe):
            self._refuse(text, m.start(1) - 1, "client command")
        if m := _MY_ELSEWHERE.search(probe):
            self._refuse(text, m.start(1) - 1, "a statement outside the target database")
        folded = probe.lower()
        for keyword in _MY_FILE_WORDS:  # rare words found at C speed, the regex only near
            at = folded.find(keyword)
            while at >= 0:
                m = _MY_FILES.search(probe, max(0, at - 96), at + 24)
                start = probe.rfind(b"\n", 0, at) + 1
                if m and _outside_mysql_strings(probe[start:m.start()]):
                    self._refuse(text, m.start() - 1, "server-side file access")
                at = folded.find(keyword, at + 1)
        self.line += text.count(b"\n")
        rest = text[text.rfind(b"\n") + 1:]
        self.open_len = len(rest)
        self.carry = rest if len(rest) <= _CARRY else b""

    def _check_local(self, chunk: bytes) -> None:
        """`LOAD DATA|XML … LOCAL` anywhere (not only at line starts), across chunk edges:
        a case-folded `find` for candidates, the regex only around each."""
        text = self.local_tail + chunk
        folded = text.lower()
        for word in (b"no_backslash_escapes", b"ansi_quotes"):  # strings read otherwise
            if (found := folded.find(word)) >= 0:
                self._refuse(text, found, "a setting that changes how strings are read",
                             skip=len(self.local_tail))
        at = folded.find(b"local")
        while at >= 0:
            start = max(0, at - 96)
            if folded.find(b"load", start, at) >= 0 and (
                    m := _MY_LOCAL.search(text, start, at + 6)):
                self._refuse(text, m.start(), "LOAD … LOCAL", skip=len(self.local_tail))
            at = folded.find(b"local", at + 5)
        self.local_tail = text[-96:]

    def _statement(self, head: bytes, line: int) -> None:
        shown = head[:40].split(b"\n", 1)[0].strip().decode("utf-8", "replace")
        norm = _normalized(head)
        # a statement longer than its head is judged by its start only where the start
        # says all (rows, a definition): `DROP TABLE IF EXISTS `t`` padded with blanks, then
        # `, mysql.user`, or `SET @a = 1` padded, then `, GLOBAL …`, must not pass
        if self.statements.cut_short and not _OPEN_ENDED.match(norm):
            raise Unsafe(f"line {line}: a statement longer than this check reads "
                         f"{shown!r} (mysqldump writes no such statement)")
        if _MY_STATEMENT.match(norm) or _MY_SYSTEM_SCHEMA.search(norm) or \
                re.search(rb"(?i)\b(?:GLOBAL|PERSIST(?:_ONLY)?)\b|@@(?:global|persist)",
                          norm) and norm[:3].upper() == b"SET":
            raise Unsafe(f"line {line}: a statement outside the target database {shown!r} "
                         "(never from a backup)")
        if not _MY_ALLOWED.match(norm if len(head) >= HEAD_MYSQL else norm + b" "):
            raise Unsafe(f"line {line}: a statement mysqldump does not write {shown!r} "
                         "(never from a backup)")
        # mysqldump loads a table's rows before its triggers: rows loaded after one would
        # run its body (as its DEFINER) during the restore
        if trigger := _MY_TRIGGER_ON.match(norm):
            self.triggered.add(_unquoted(trigger.group(1)))
        elif (insert := _MY_INSERT_INTO.match(norm)) and \
                _unquoted(insert.group(1)) in self.triggered:
            raise Unsafe(f"line {line}: rows loaded into a table after its trigger was "
                         f"created {shown!r} (they would run it; mysqldump never does that)")
        if why := _setting_refused(head):
            raise Unsafe(f"line {line}: {why} {shown!r} (the server would read the rest of "
                         "the file otherwise than this check; never from a backup)")

    def _refuse(self, text: bytes, at: int, what: str, skip: int = 0) -> None:
        line = self.line + text.count(b"\n", skip, max(at, skip))
        body = text[at:at + 40].split(b"\n", 1)[0].strip()
        raise Unsafe(f"line {line}: {what} {body.decode('utf-8', 'replace')!r} (the client "
                     "would run it on the restoring host; never from a backup)")

    local_tail = b""

    def finish(self) -> FileFacts:
        try:
            self.statements.finish()
        except ValueError as exc:
            raise Unsafe(f"line {self.statements.line}: {exc}") from None
        if not self.header_seen:
            raise BadRequest("not a MariaDB/MySQL dump (no '-- MariaDB dump' or '-- MySQL "
                             "dump' header)", code="invalid_upload")
        if _MY_FOOTER not in self.tail:
            raise BadRequest("the MySQL dump is incomplete (no '-- Dump completed' footer): "
                             "it was cut off", code="invalid_upload")
        return {"raw_bytes": self.size, "tool": "mysqldump (uploaded)"}


def _outside_mysql_strings(prefix: bytes) -> bool:
    """Whether the end of `prefix` (a line start up to a match) is outside quotes, reading
    mysqldump's escapes (backslash, doubled quotes)."""
    quote = b""
    i, n = 0, len(prefix)
    while i < n:
        c = prefix[i:i + 1]
        if quote:
            if c == b"\\":
                i += 2
                continue
            if c == quote:
                quote = b""
        elif c in (b"'", b'"', b"`"):
            quote = c
        i += 1
    return not quote


def validate_mysql(chunks: Iterator[bytes]) -> FileFacts:
    """A complete mariadb-dump/mysqldump SQL file without client commands."""
    check = MySQLScriptCheck()
    for chunk in chunks:
        check.feed(chunk)
    return check.finish()
