"""What each engine restores, checked before anything is restored from it.

Every byte of a backup file is untrusted until checked. `validate(engine, path, …)` reads the
whole file once (decompressing it under an inflation bound, hashing the stored bytes) and
raises BadRequest (`invalid_upload` / `unsafe_backup`, with the line or statement at fault)
unless it is content that engine's restore accepts and nothing in it can reach outside the
database. It returns manifest facts found on the way (plain size, counts…). Blocking: run it
in a thread. The API runs it on uploads; the worker runs it again before a restore touches
anything (a file put into storage by hand gets the same checks).
"""

from __future__ import annotations

import json
import re
import sqlite3
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from shared import backup_sets, scratch
from shared.codecs import PlainReader, Readable, Step, WindowDigests
from shared.cypher import StatementSplitter, check_command, check_statement
from shared.errors import BadRequest, PipelineError
from shared.mysqlscan import HEAD as HEAD_MYSQL
from shared.mysqlscan import StatementStarts
from shared.pgscript import PgScriptGuard, UnsafeScript
from shared.resp import RespReader
from shared.tarstream import TarReader

_PG_CUSTOM_MAGIC = b"PGDMP"


class Unsafe(BadRequest):
    """Content no Safehold restore will run."""

    code = "unsafe_backup"


def _sized(chunks: Iterator[bytes], box: list[int]) -> Iterator[bytes]:
    for chunk in chunks:
        box[0] += len(chunk)
        yield chunk


# ------------------------------------------------------------------ PostgreSQL
def validate_postgresql(chunks: Iterator[bytes]) -> dict[str, Any]:
    """A complete plain-SQL pg_dump (footer present) with no psql meta-commands, no
    transaction control and no COPY other than FROM stdin (see `shared.pgscript`)."""
    guard = PgScriptGuard()
    size = 0
    for chunk in chunks:
        if size == 0 and chunk.startswith(_PG_CUSTOM_MAGIC):
            raise BadRequest("this is a pg_dump custom-format archive; upload a plain SQL dump "
                             "(pg_dump --format=plain)", code="invalid_upload")
        if size == 0 and b"-- PostgreSQL database dump" not in chunk[:4096]:
            raise BadRequest("not a PostgreSQL plain SQL dump (no '-- PostgreSQL database "
                             "dump' header)", code="invalid_upload")
        size += len(chunk)
        guard.feed(chunk)
    if size == 0:
        raise BadRequest("the PostgreSQL dump is empty", code="invalid_upload")
    guard.finish()
    return {"raw_bytes": size, "tool": "pg_dump (uploaded)"}


# ------------------------------------------------------------------ MySQL / MariaDB
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
# the same, at the start of every statement as the client splits them (shared/mysqlscan):
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

    def finish(self) -> dict[str, Any]:
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


def validate_mysql(chunks: Iterator[bytes]) -> dict[str, Any]:
    """A complete mariadb-dump/mysqldump SQL file without client commands."""
    check = MySQLScriptCheck()
    for chunk in chunks:
        check.feed(chunk)
    return check.finish()


# ------------------------------------------------------------------ Redis
class RedisScriptCheck:
    """Exactly what Safehold's writer emits: `SELECT n` (n in `allowed` when given), then
    `RESTORE key ttl payload REPLACE [ABSTTL]`. Anything else (CONFIG, MODULE, EVAL,
    FLUSHALL, SLAVEOF…) is refused. Used on the whole file before a restore flushes
    anything, and again on each chunk before the restore sends it (a command is only run
    by Redis once complete, and the check sees it complete first)."""

    def __init__(self, allowed: set[int] | None = None) -> None:
        self.reader = RespReader(max_parts=6)
        self.allowed = allowed
        self.size = self.keys = self.commands = 0
        self.databases: set[int] = set()

    def feed(self, chunk: bytes) -> None:
        if self.size == 0 and chunk.startswith(b"REDIS"):
            raise BadRequest("this is an RDB snapshot: restore it by placing it as the "
                             "server's dump.rdb (see the README); uploads take RESP "
                             "backups", code="invalid_upload")
        self.size += len(chunk)
        try:
            commands = self.reader.feed(chunk)
        except (ValueError, PipelineError) as exc:
            raise BadRequest(f"not a RESP Redis backup: {exc}", code="invalid_upload") \
                from None
        for cmd in commands:
            self.commands += 1
            n = len(cmd)
            if (n == 5 or n == 6) and cmd[0] == b"RESTORE" and cmd[4] == b"REPLACE" \
                    and (n == 5 or cmd[5] == b"ABSTTL") and self.databases \
                    and cmd[2] is not None and cmd[2].isdigit():
                self.keys += 1  # what Safehold writes, spelled as it writes it
                continue
            name = (cmd[0] or b"?").upper()
            arg = [c or b"" for c in cmd]  # None: an argument too long to keep
            if name == b"SELECT" and len(cmd) == 2 and arg[1].isdigit() and len(arg[1]) <= 5 \
                    and (self.allowed is None or int(arg[1]) in self.allowed):
                self.databases.add(int(arg[1]))
            elif (name == b"RESTORE" and self.databases and len(cmd) in (5, 6)
                  and arg[2].isdigit() and arg[4].upper() == b"REPLACE"
                  and (len(cmd) == 5 or arg[5].upper() == b"ABSTTL")):
                self.keys += 1
            else:
                shown = b" ".join(a[:30] for a in arg[:2]).decode("utf-8", "replace")
                raise Unsafe(f"command {self.commands}: {shown!r} is not in a Safehold Redis "
                             "backup (only SELECT n, then RESTORE … REPLACE [ABSTTL])")

    def finish(self) -> dict[str, Any]:
        try:
            self.reader.finish()
        except PipelineError as exc:
            raise BadRequest(f"not a RESP Redis backup: {exc}", code="invalid_upload") \
                from None
        if self.keys == 0 and self.size == 0:
            raise BadRequest("the Redis backup is empty", code="invalid_upload")
        return {"raw_bytes": self.size, "format": "resp", "databases": sorted(self.databases),
                "counts": {"keys": self.keys}, "tool": "RESP (uploaded)"}


def validate_redis(chunks: Iterator[bytes]) -> dict[str, Any]:
    """A RESP stream of SELECT and RESTORE commands (see RedisScriptCheck)."""
    check = RedisScriptCheck()
    for chunk in chunks:
        check.feed(chunk)
    return check.finish()


# ------------------------------------------------------------------ SQLite
def check_sqlite_file(path: Path) -> None:
    """Blocking: raise unless `path` is an SQLite database that passes integrity checks."""
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise ValueError("not an SQLite database (bad header)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if result != ["ok"]:
            raise ValueError("integrity_check: " + "; ".join(result[:5]))
        bad_fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        if bad_fk:
            raise ValueError(f"foreign_key_check found {len(bad_fk)} violation(s)")
    except sqlite3.DatabaseError as exc:
        raise ValueError(str(exc)) from None
    finally:
        conn.close()


def validate_sqlite(chunks: Iterator[bytes]) -> dict[str, Any]:
    """A whole SQLite database file that passes integrity and foreign-key checks. The plain
    file is written to a temp directory, never past the inflation bound of `chunks`."""
    with scratch.private_dir("upload") as tmp:
        plain = scratch.private_file(tmp, "upload.db")
        size = 0
        with open(plain, "wb") as out:
            for chunk in chunks:
                if size == 0 and not chunk.startswith(b"SQLite format 3\x00"):
                    raise BadRequest("not a sound SQLite database: not an SQLite database "
                                     "(bad header)", code="invalid_upload")
                size += len(chunk)
                out.write(chunk)
        try:
            check_sqlite_file(plain)
        except ValueError as exc:
            raise BadRequest(f"not a sound SQLite database: {exc}", code="invalid_upload") \
                from None
    return {"raw_bytes": size, "tool": "sqlite3 (uploaded)"}


# ------------------------------------------------------------------ Neo4j
def validate_neo4j(chunks: Iterator[bytes]) -> dict[str, Any]:
    """A UTF-8 Cypher script of the statement shapes the exporters write."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    splitter = StatementSplitter()
    size, count = 0, 0

    def check(statements: list[str]) -> None:
        nonlocal count
        for stmt in statements:
            count += 1
            line = splitter.lines.pop(0)
            if (why := check_statement(stmt)) is not None:
                raise Unsafe(f"line {line}: statement {count} refused ({why}): {stmt[:60]!r}")
        while splitter.commands:
            command = splitter.commands.pop(0)
            if (why := check_command(command)) is not None:
                raise Unsafe(f"after statement {count}: {why} refused")

    try:
        for chunk in chunks:
            if b"\0" in chunk:
                raise Unsafe("a NUL byte in the Cypher script")
            size += len(chunk)
            check(splitter.feed(decoder.decode(chunk)))
        check(splitter.feed(decoder.decode(b"", final=True), final=True))
    except UnicodeDecodeError:
        raise BadRequest("the Cypher script is not UTF-8", code="invalid_upload") from None
    if count == 0:
        raise BadRequest("the Cypher script holds no statement", code="invalid_upload")
    return {"raw_bytes": size, "counts": {"statements": count}, "tool": "cypher (uploaded)"}


# ------------------------------------------------------------------ MongoDB
_MONGO_NAME = re.compile(r"^[^/\\. \"$\0][^/\\ \"$\0]{0,63}\Z")
_MONGO_COLL = re.compile(r"^[^$\0/][^$\0/]{0,200}\Z")
MONGO_SYSTEM_DBS = frozenset({"admin", "local", "config"})


def check_mongo_member(name: str) -> tuple[str, str, str] | None:
    """(db, collection, kind) of a mongodump-layout member; None for prelude.json; raises
    on anything else (other paths, system databases, `system.` collections)."""
    if name == "prelude.json":
        return None
    parts = name.split("/")
    kind = ""
    if len(parts) == 2:
        db, file = parts
        for suffix in (".metadata.json", ".bson"):
            if file.endswith(suffix):
                kind, coll = suffix, file[: -len(suffix)]
                break
    if not kind or not _MONGO_NAME.match(db) or not _MONGO_COLL.match(coll):
        raise Unsafe(f"tar member {name[:80]!r} is not in the mongodump layout "
                     "(<db>/<collection>.bson / .metadata.json)")
    if db in MONGO_SYSTEM_DBS or coll.startswith("system."):
        raise Unsafe(f"tar member {name[:80]!r}: system databases and collections are never "
                     "restored")
    return db, coll, kind


def check_mongo_metadata(name: str, raw: bytes) -> None:
    """Collection options and indexes only, in their documented shapes; no server-side
    JavaScript ($where, $function, $accumulator — JSON escapes decoded first) anywhere in
    validators, view pipelines or index filters, and no storage-engine configuration."""
    try:
        meta = json.loads(raw)
    except ValueError:
        raise BadRequest(f"{name}: metadata is not JSON", code="invalid_upload") from None
    if not isinstance(meta, dict) or set(meta) - {"options", "indexes", "uuid",
                                                  "collectionName", "type"}:
        raise Unsafe(f"{name}: unexpected metadata keys")
    options, indexes = meta.get("options", {}), meta.get("indexes", [])
    if not isinstance(options, dict) or not isinstance(indexes, list) or not all(
            isinstance(ix, dict) and isinstance(ix.get("key", {}), dict) for ix in indexes):
        raise BadRequest(f"{name}: options must be an object and indexes a list of objects",
                         code="invalid_upload")
    for key in _json_keys(meta):
        if key in ("$where", "$function", "$accumulator"):
            raise Unsafe(f"{name}: server-side JavaScript ({key}) is refused")
        if key == "storageEngine":
            raise Unsafe(f"{name}: storage-engine configuration is refused")


def _json_keys(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield from item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def tar_events(reader: TarReader, chunks: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    """Drive a TarReader from `chunks` until the end-of-archive block."""
    while True:
        event = reader.next_event()
        if event is None:
            chunk = next(chunks, None)
            if chunk is None:
                raise BadRequest("the tar stream ends early (cut off)", code="invalid_upload")
            reader.push(chunk)
            continue
        if event[0] == "eof":
            return
        yield event


class BsonCounter:
    """Counts documents in a BSON stream fed in pieces; refuses impossible lengths."""

    def __init__(self, name: str) -> None:
        self.name, self.count, self._buf = name, 0, bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        at = 0
        while len(self._buf) - at >= 4:
            length = struct.unpack_from("<i", self._buf, at)[0]
            if length < 5 or length > 48 << 20:
                raise BadRequest(f"{self.name}: document {self.count + 1} has an impossible "
                                 "length", code="invalid_upload")
            if len(self._buf) - at < length:
                break
            if self._buf[at + length - 1] != 0:
                raise BadRequest(f"{self.name}: document {self.count + 1} is malformed",
                                 code="invalid_upload")
            at += length
            self.count += 1
        del self._buf[:at]

    def finish(self) -> int:
        if self._buf:
            raise BadRequest(f"{self.name}: ends inside a document", code="invalid_upload")
        return self.count


def validate_mongodb(chunks: Iterator[bytes]) -> dict[str, Any]:
    """A tar stream in mongodump's layout with well-formed BSON documents."""
    box = [0]
    counts: dict[str, int] = {}
    dbs: set[str] = set()
    events = tar_events(TarReader(), _sized(chunks, box))
    for kind, payload in events:
        if kind != "file":
            continue
        name, size = payload
        where = check_mongo_member(name)
        if where is not None and where[2] == ".metadata.json" and size > 16 << 20:
            raise Unsafe(f"{name}: metadata larger than 16 MiB")
        meta, docs = bytearray(), BsonCounter(name)
        for kind, data in events:
            if kind == "end":
                break
            if where is None:
                continue
            if where[2] == ".metadata.json":
                meta += data
            else:
                docs.feed(data)
        if where is None:
            continue
        db, coll, suffix = where
        dbs.add(db)
        if suffix == ".metadata.json":
            check_mongo_metadata(name, bytes(meta))
        else:
            counts[f"{db}.{coll}"] = docs.finish()
    if not counts and box[0] == 0:
        raise BadRequest("the MongoDB backup is empty", code="invalid_upload")
    return {"raw_bytes": box[0], "counts": counts, "count_kind": "documents",
            "databases": sorted(dbs), "tool": "mongodump layout (uploaded)"}


def check_scope(engine: str, url: str, info: dict[str, Any]) -> None:
    """A backup may only touch what its target names: a Redis target scoped to one logical
    database, a MongoDB target scoped to databases in its URL's path."""
    from urllib.parse import unquote, urlsplit

    path = unquote(urlsplit(url).path.strip("/"))
    if engine == "redis" and path.isdigit():
        allowed: set[Any] = {int(path)}
    elif engine == "mongodb" and path:
        allowed = {d for d in path.split(",") if d}
    else:
        return
    outside = sorted(set(info.get("databases") or []) - allowed)
    if outside:
        raise Unsafe(f"the backup writes to database(s) {outside}, outside this target "
                     f"({sorted(allowed)}); restore it into the target it came from")


VALIDATORS: dict[str, Callable[[Iterator[bytes]], dict[str, Any]]] = {
    "postgresql": validate_postgresql,
    "sqlite": validate_sqlite,
    "mysql": validate_mysql,
    "redis": validate_redis,
    "neo4j": validate_neo4j,
    "mongodb": validate_mongodb,
}


def validate(engine: str, raw: Readable, chain: Sequence[Step], *, limit: int | None,
             expect_sha256: str | None = None,
             on_stored: Callable[[int], None] | None = None,
             identities: Sequence[Any] = (),
             windows: WindowDigests | None = None,
             set_token: str | None = None) -> dict[str, Any]:
    """Check stored bytes (`raw`, decoded by `chain`) for `engine` (see the module
    docstring). With `expect_sha256` the stored bytes must also match it (IntegrityError).
    `windows`, if given, is fed the plain bytes checked (a restore's load proves it loads
    those). `set_token`: a backup set, each member checked by the engine's validator.
    Blocking: runs in a thread."""
    validator = VALIDATORS.get(engine)
    if validator is None:
        raise BadRequest(f"uploads for {engine} targets are not supported",
                         code="upload_unsupported")
    if set_token is not None:
        validator = backup_sets.validate_set(validator, set_token)
    reader = PlainReader(raw, chain, limit=limit, expect_sha256=expect_sha256,
                         on_stored=on_stored, identities=identities)

    def plain() -> Iterator[bytes]:
        for chunk in reader:
            if windows is not None:
                windows.feed(chunk)
            yield chunk

    try:
        info = validator(plain())
        while (chunk := reader.next_chunk()) is not None:  # the rest (tar padding…)
            if windows is not None:
                windows.feed(chunk)
        return info
    except UnsafeScript:
        raise
    except PipelineError as exc:
        if exc.code in ("checksum_mismatch", "expansion_limit", "wrong_identity",
                        "identity_required"):
            raise
        raise BadRequest(f"the file is not a valid backup: {exc.message}",
                         code="invalid_upload") from None
    finally:
        reader.close()
