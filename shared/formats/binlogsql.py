"""What `mariadb-binlog` decodes from an archived binlog, checked before the client reads it
(issue 26's replay to a point in time). Binlog bytes are hostile input like any backup:
the replay runs in a scratch server of its own, and only what the decoder writes for the
target's database may reach it.

The text is split as the client splits it (`mysqlscan.StatementStarts`, with the
decoder's `DELIMITER /*!*/;`) and every statement must be one the decoder writes: a session
setting, a transaction's start or end, `use` of the target's database, a table's DDL or
DML, grants — never a global setting, a file or plugin loaded, replication or server
control. The row events inside `BINLOG '…'` are decoded too: only a format description,
table maps of the target's database, and row events on those tables (a query event in
there would run unseen). The decoder's `\\C charset` client command, written on a line of
its own between statements, is replaced by the same `SET NAMES` (only character sets that
keep quotes and backslashes ASCII); any other client command is refused by the scanner.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from shared.errors import PipelineError
from shared.formats.binlog import FORMAT_DESCRIPTION, TABLE_MAP, EventReader
from shared.formats.common import Unsafe
from shared.formats.mysql import _normalized
from shared.formats.mytables import LineFilter, LineStatements

_CHARSET_LINE = re.compile(rb"/\*!\\C ([a-z0-9_]{1,32}) \*//\*!\*/;\r?\n")
HOLD_MAX = 16 << 20
SAFE_CHARSETS = {b"utf8", b"utf8mb3", b"utf8mb4", b"latin1", b"ascii", b"binary"}
_B64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
ROWS = {23, 24, 25, 30, 31, 32, 39, 166, 167, 168, 169, 170, 171}
ANNOTATE_ROWS = 160
_KINDS = re.compile(
    rb"(?is)(?:ROLLBACK\s*(?:/\*[^*]*\*/\s*)?$|BEGIN\s*$|START TRANSACTION\s*$|COMMIT\s*$|"
    rb"SAVEPOINT |RELEASE SAVEPOINT |"
    rb"BINLOG '|(?:CREATE|ALTER|DROP|TRUNCATE|RENAME|ANALYZE|OPTIMIZE|REPAIR) |"
    rb"(?:INSERT|UPDATE|DELETE|REPLACE) |(?:GRANT|REVOKE) )")
_NEVER = re.compile(
    rb"(?is)(?:CREATE (?:DEFINER ?= ?\S+ )?(?:AGGREGATE )?FUNCTION\b[^(]*\bSONAME\b|"
    rb"(?:CREATE|ALTER|DROP) SERVER\b|.*\bINTO\s+(?:OUTFILE|DUMPFILE)\b|"
    rb".*\bLOAD_FILE\s*\()")
# a session setting line as the decoder writes it, whole (it may run past a head's bytes)
_ASSIGN = (rb"(?:@@(?:session\.)?[A-Za-z_0-9]{1,64}|TIMESTAMP|INSERT_ID|LAST_INSERT_ID)="
           rb"(?:-?[0-9][0-9.]{0,40}|[A-Za-z0-9_]{1,64})")
_SET_LINE = re.compile(rb"SET " + _ASSIGN + rb"(?:, ?" + _ASSIGN + rb"){0,40}/\*!\*/;\r?\n")
_ONE = re.compile(rb"(@@(?:session\.)?[A-Za-z_0-9]{1,64}|TIMESTAMP|INSERT_ID|LAST_INSERT_ID)="
                  rb"(-?[0-9][0-9.]{0,40}|[A-Za-z0-9_]{1,64})", re.I)
# the session variables the decoder sets, and nothing that reaches past the session
SESSION_VARS = {
    b"pseudo_thread_id", b"foreign_key_checks", b"sql_auto_is_null", b"unique_checks",
    b"autocommit", b"check_constraint_checks", b"sql_if_exists",
    b"explicit_defaults_for_timestamp", b"system_versioning_insert_history", b"sql_mode",
    b"auto_increment_increment", b"auto_increment_offset", b"character_set_client",
    b"collation_connection", b"collation_server", b"lc_time_names", b"collation_database",
    b"skip_parallel_replication", b"gtid_domain_id", b"server_id", b"gtid_seq_no",
    b"max_delayed_threads", b"pseudo_slave_mode", b"timestamp", b"insert_id",
    b"last_insert_id", b"rand_seed1", b"rand_seed2"}
# sql_mode bits that change how the text is read (quotes, escapes, another dialect)
READING_MODES = 4 | 256 | 512 | 1024 | 2048 | 4096 | 262144 | 1048576
SAFE_COLLATIONS = {b"8", b"11", b"33", b"45", b"46", b"63", b"83", b"192", b"224", b"DEFAULT"}
_SAFE_COLLATION = re.compile(rb"(?i)(?:utf8|utf8mb3|utf8mb4|latin1|ascii)_[a-z0-9_]{1,40}|binary")
# the few settings the decoder writes in another form (its prologue and epilogue)
_FIXED_SETS = re.compile(
    rb"(?i)SET (?:@@SESSION\.PSEUDO_SLAVE_MODE=[01]|@@session\.max_delayed_threads=0|"
    rb"@OLD_COMPLETION_TYPE=@@COMPLETION_TYPE,\s*COMPLETION_TYPE=0|"
    rb"COMPLETION_TYPE=@OLD_COMPLETION_TYPE|NAMES (?:utf8|utf8mb3|utf8mb4|latin1|ascii|binary)|"
    rb"@@session\.time_zone='[A-Za-z0-9_+:/-]{1,64}')\s*(?:\*/)?\s*")


def _settings_ok(assignments: list[tuple[bytes, bytes]]) -> bool:
    """Session settings only, none changing how the rest is read."""
    for name, value in assignments:
        var = name.lower().removeprefix(b"@@session.").removeprefix(b"@@")
        if var not in SESSION_VARS:
            return False
        if var == b"sql_mode" and not (value.isdigit() and
                                       not int(value) & READING_MODES):
            return False
        if var == b"character_set_client" and value.lower() not in SAFE_CHARSETS:
            return False
        if var.startswith(b"collation_") and value.upper() not in SAFE_COLLATIONS and \
                not _SAFE_COLLATION.fullmatch(value):
            return False
    return True


_ASSIGNMENTS = re.compile(rb"(?i)SET " + _ASSIGN + rb"(?:,\s?" + _ASSIGN +
                          rb"){0,40}\s*(?:\*/)?\s*")
_USE = re.compile(rb"(?is)USE (?:`((?:[^`]|``)+)`|([A-Za-z0-9_$]+))\s*")


# words no statement of a replay may hold anywhere in its code (strings, quoted names and
# plain comments aside; an executable comment is code): BINLOG outside the one layout the
# decoder writes (its row events would skip every table privilege), dynamic SQL (which
# could build one from strings), files and plugins — the check reads all of a statement,
# not its start: the client sends `INSERT …; BINLOG '…'` as one query. A digit may stand
# before such a word (`1146.0BINLOG` is a number, then the keyword, to the server).
_CODE_WORDS = re.compile(rb"(?i)(?<![A-Za-z_$])(BINLOG|EXECUTE|PREPARE|DEALLOCATE|SONAME|"
                         rb"OUTFILE|DUMPFILE|INFILE|LOAD_FILE)(?![A-Za-z0-9_$])")
# settings that change how the server reads the statements after them in the same query
# (a routine's body may hold several; a setting line is judged whole, apart)
_READING_WORDS = re.compile(rb"(?i)(?<![A-Za-z_$])(SQL_MODE|NAMES|CHARSET|CHARACTER_SET_\w*|"
                            rb"COLLATION_CONNECTION)(?![A-Za-z0-9_$])")
_LITERALS = re.compile(rb"""'[^'\\]*(?:\\.[^'\\]*)*'|"[^"\\]*(?:\\.[^"\\]*)*"|`[^`]*`""",
                       re.S)
_MARKER = re.compile(rb"/\*M?!(\d*)")
# a routine, trigger or event: its body may hold several statements, each ending in `;`
_COMPOUND = re.compile(rb"(?is)CREATE\s+(?:OR\s+REPLACE\s+)?(?:DEFINER\s*=\s*\S+\s+)?"
                       rb"(?:AGGREGATE\s+)?(?:PROCEDURE|FUNCTION|TRIGGER|EVENT)\b")


class BinlogStatements(LineStatements):
    """The client's statements, and in each one's code: every word of `_CODE_WORDS` and
    `_READING_WORDS`, a `;` (one query holding several statements), an executable comment
    MariaDB skips though the scanner reads it (`/*!50700` to `/*!99999`: MySQL's)."""

    DELIMITER_LINES = (b"DELIMITER /*!*/;", b"DELIMITER ;")

    def __init__(self, on_statement: Callable[[bytes, int], None]) -> None:
        super().__init__(on_statement)
        self.words: list[bytes] = []  # of the statement under way
        self.reading: list[bytes] = []

    def feed_line(self, line: bytes) -> None:
        delimiter = self.delimiter
        super().feed_line(line)
        if self.delimiter != delimiter:  # a DELIMITER line: no statement's words
            self.words, self.reading = [], []

    def _take(self, piece: bytes) -> None:
        # code (its complete strings and quoted names blanked); a piece of code ends where
        # a token does (a quote, a comment, the delimiter, a newline): never inside a word
        if self.state == b"":
            for m in _MARKER.finditer(piece):
                if m[1] and 50700 <= int(m[1]) <= 99999:
                    self.words.append(m.group())
            code = _MARKER.sub(b" ", _LITERALS.sub(b" ", piece))
            self.words += [m[1].upper() for m in _CODE_WORDS.finditer(code)]
            self.reading += [m[1].upper() for m in _READING_WORDS.finditer(code)]
            if b";" in code:
                self.words.append(b";")
        super()._take(piece)


class BinlogSqlCheck(LineFilter):
    """Feed the decoder's output; returns what the client may read (the same bytes, the
    `\\C` lines rewritten). Unsafe names the statement and binlog position refused."""

    def __init__(self, database: str) -> None:
        self.database = database.encode()
        self.scan = BinlogStatements(self._statement)
        self._events: EventReader | None = None  # inside a BINLOG statement
        self.tables: dict[int, bytes] = {}  # table id -> database, from the table maps
        self.statements = self.row_events = 0
        self.at = b"?"  # the binlog position of the event being read (`# at N`)
        self._whole_setting = False  # the statement under way is a setting line seen whole
        self._sent_partly = False  # a statement under way had its first line passed on
        self._held: list[bytes] = []  # the statement under way, until it is judged
        self._held_size = 0
        self._verdicts: list[bool] = []  # of the statements that ended in this line
        self._binlog_block = False  # a BINLOG statement in the decoder's layout under way
        self.skipped: list[str] = []  # statements about other databases, left out

    def finish(self) -> bytes:
        out = self._rest()
        if self._events is not None:
            self._refuse("the output ends inside a BINLOG statement")
        try:
            self.scan.finish()
        except ValueError as exc:
            self._refuse(str(exc))
        return out

    def _refuse(self, why: str) -> None:
        raise Unsafe(f"binlog at position {self.at.decode('ascii', 'replace')}: {why}; "
                     "the point-in-time restore stopped before the live database was "
                     "touched")

    def _line(self, line: bytes) -> bytes:
        """One line: checked, then passed on — held while its statement is under way
        and dropped with it when that statement is about another database. A BINLOG
        statement's lines stream (its events are checked as they pass)."""
        streaming = self._events is not None
        if self._events is not None:
            body = line.rstrip(b"\r\n")
            if body.startswith(b"'"):  # the statement's end: `'/*!*/;`, nothing else (a
                # second string after it would be read by the server, never decoded here)
                if body != b"'/*!*/;":
                    self._refuse("a BINLOG statement not ended as the decoder ends it")
                if self._events.pending:
                    self._refuse("a row event cut short inside BINLOG")
                self._events = None
            else:
                self._binlog_line(body)
        elif self.scan.between:
            if line.startswith(b"# at "):
                self.at = line[5:].strip()[:20]
            elif m := _CHARSET_LINE.fullmatch(line):
                if m[1] not in SAFE_CHARSETS:
                    self._refuse(f"the client character set {m[1].decode()} (only "
                                 "ASCII-safe ones are replayed)")
                line = b"SET NAMES " + m[1] + b"/*!*/;\n"
            elif line.rstrip(b"\r\n") == b"BINLOG '":
                self._events = EventReader(magic=False)
                self._binlog_block = streaming = True
            self._whole_setting = bool(_SET_LINE.fullmatch(line)) and _settings_ok(
                [(m[1], m[2]) for m in _ONE.finditer(line)])
        was_between = self.scan.between and not self._held
        self._verdicts = []
        try:
            self.scan.feed_line(line)  # statements that end here are checked (may raise)
        except ValueError as exc:
            self._refuse(str(exc))
        if False in self._verdicts and self._sent_partly:
            self._refuse("a statement left out whose start was passed on with another")
        if streaming:
            if False in self._verdicts:
                self._refuse("a BINLOG statement sharing its line with one left out")
            out, self._held, self._held_size = b"".join(self._held) + line, [], 0
            self._sent_partly = not self.scan.between
            return out
        if not self._verdicts and was_between and self.scan.between:
            return line  # a comment or a blank line between statements
        self._held.append(line)
        self._held_size += len(line)
        if not self._verdicts:
            if self._held_size > HOLD_MAX:
                self._refuse("a statement of over 16 MiB")
            return b""
        if all(self._verdicts):
            out = b"".join(self._held)
            # a statement begun on this line after the one judged goes out with it: it
            # may no longer be left out (refused instead, above)
            self._sent_partly = not self.scan.between
        elif not any(self._verdicts) and self.scan.between:
            out = b""
        else:
            self._refuse("a line holding a statement replayed and one left out")
        self._held, self._held_size = [], 0
        return out

    def _binlog_line(self, body: bytes) -> None:
        if len(body) % 4 or not _B64.fullmatch(body):
            self._refuse("a BINLOG statement that is not base64 as the decoder writes it")
        assert self._events is not None
        try:
            raw = base64.b64decode(body, validate=True)
            events = self._events.feed(raw)
        except (binascii.Error, PipelineError) as exc:
            self._refuse(f"a BINLOG statement holding no binlog events ({exc})")
        for ev in events:
            kind = ev.type
            if kind == FORMAT_DESCRIPTION:
                _layout_as_read(ev.data)  # the header and table ids as parsed below
                continue
            if kind == ANNOTATE_ROWS:
                continue
            if kind == TABLE_MAP:
                table_id, db = _table_map(ev.data)
                if db != self.database:
                    self._refuse(f"a row event for database {db.decode('utf-8', 'replace')!r}"
                                 " (only the target's is replayed)")
                self.tables[table_id] = db
            elif kind in ROWS:
                table_id = int.from_bytes(ev.data[19:25], "little")
                if self.tables.get(table_id) != self.database:
                    self._refuse("a row event on a table no table map of the target's "
                                 "database named")
                self.row_events += 1
            else:
                self._refuse(f"an event of type {kind} inside BINLOG (only row events are "
                             "replayed that way)")

    def _statement(self, head: bytes, line: int) -> None:
        self.statements += 1
        text = _normalized(head)
        self._verdicts.append(True)
        words, self.scan.words = self.scan.words, []
        reading, self.scan.reading = self.scan.reading, []
        block, self._binlog_block = self._binlog_block, False
        if block:  # its events were decoded and checked as its lines passed
            if words != [b"BINLOG"] or reading or not text.startswith(b"BINLOG '"):
                self._refuse("a BINLOG statement holding more than its events")
            return
        compound = bool(_COMPOUND.match(text))
        if compound:  # its body's statements end in `;`; none may change how text is read
            words = [w for w in words if w != b";"]
            if reading:
                self._refuse(f"{reading[0].decode()} in a routine, trigger or event "
                             f"({_shown(text)}): a setting that changes how text is read")
        if b";" in words:
            self._refuse(f"several statements in one ({_shown(text)}): the decoder writes "
                         "one per event")
        if words:
            self._refuse(f"{words[0].decode()} in a statement ({_shown(text)}): only the "
                         "decoder's own BINLOG blocks are replayed, no dynamic SQL, file, "
                         "plugin or MySQL-only comment")
        if m := _USE.fullmatch(text):
            name = (m[1] or b"").replace(b"``", b"`") or m[2]
            if name != self.database:
                self._refuse(f"a statement for database {name.decode('utf-8', 'replace')!r} "
                             "(only the target's is replayed)")
            return
        if text.upper().startswith(b"SET "):
            short = not self.scan.cut_short and (_FIXED_SETS.fullmatch(text) or (
                _ASSIGNMENTS.fullmatch(text) and _settings_ok(
                    [(m[1], m[2]) for m in _ONE.finditer(text)])))
            if not (self._whole_setting or short):
                self._refuse(f"a setting the decoder does not write ({_shown(text)})")
            return
        if not _KINDS.match(text) or _NEVER.match(text):
            self._refuse(f"a statement a replay never runs ({_shown(text)})")
        names = _objects(text)
        others = [db for db in names if db is not None and db != self.database]
        if others and len(others) == len(names):
            self._verdicts[-1] = False  # about another database only: left out
            self.skipped.append(f"{self.at.decode('ascii', 'replace')}: {_shown(text)}")
        elif others:
            self._refuse(f"a statement about the target's and another database at once "
                         f"({_shown(text)})")


_NAME = rb"(?:`(?:[^`]|``)+`|[A-Za-z0-9_$]+)"
_QUALIFIED = re.compile(rb"(" + _NAME + rb")\s*\.\s*" + _NAME + rb"|" + _NAME)
_OBJECT = re.compile(
    rb"(?is)(?:(?:CREATE|ALTER|DROP|TRUNCATE|RENAME|ANALYZE|OPTIMIZE|REPAIR)\s+"
    rb"(?:OR\s+REPLACE\s+)?(?:ONLINE\s+|IGNORE\s+)?(?:DEFINER\s*=\s*\S+\s+)?"
    rb"(?:SQL\s+SECURITY\s+\w+\s+)?(?:ALGORITHM\s*=\s*\w+\s+)?(?:TEMPORARY\s+)?"
    rb"(?:TABLES?|VIEW|TRIGGER|PROCEDURE|FUNCTION|EVENT|SEQUENCE|"
    rb"(?:UNIQUE\s+|FULLTEXT\s+|SPATIAL\s+)?INDEX\s+\S+\s+ON)?\s*"
    rb"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?|(?:INSERT|REPLACE)\s+(?:(?:LOW_PRIORITY|DELAYED|"
    rb"HIGH_PRIORITY|IGNORE)\s+)*(?:INTO\s+)?|UPDATE\s+(?:(?:LOW_PRIORITY|IGNORE)\s+)*|"
    rb"DELETE\s+(?:(?:LOW_PRIORITY|QUICK|IGNORE)\s+)*FROM\s+)")
_DATABASE = re.compile(rb"(?is)(?:CREATE|DROP|ALTER)\s+(?:DATABASE|SCHEMA)\s+"
                       rb"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(" + _NAME + rb")")


_ALTER_TABLE = re.compile(rb"(?is)ALTER\s+(?:ONLINE\s+|IGNORE\s+)*TABLE\b")
_RENAMED = re.compile(rb"(?is)\bRENAME\s+(?:TO\s+|AS\s+)?(?!(?:COLUMN|INDEX|KEY)\b)"
                      rb"(?:(" + _NAME + rb")\s*\.\s*)?" + _NAME)


def _ident(raw: bytes) -> bytes:
    return raw[1:-1].replace(b"``", b"`") if raw.startswith(b"`") else raw


def _objects(text: bytes) -> list[bytes | None]:
    """The databases of the objects a statement is about (None: unqualified, the `use`d
    one); DROP TABLE a, b (VIEW, SEQUENCE), RENAME TABLE a TO b, c TO d and ALTER TABLE a
    RENAME TO b name several."""
    if m := _DATABASE.match(text):
        return [_ident(m[1])]
    m = _OBJECT.match(text)
    if m is None:
        return []
    rest, names = text[m.end():], []
    several = re.match(rb"(?is)(?:DROP\s+(?:TEMPORARY\s+)?(?:TABLES?|VIEWS?|SEQUENCES?)|"
                       rb"RENAME\s+TABLES?)\b", text)
    while (found := _QUALIFIED.match(rest)) is not None:
        names.append(_ident(found[1]) if found[1] else None)
        rest = rest[found.end():].lstrip()
        if not several:
            break
        if rest[:3].upper() == b"TO ":
            rest = rest[3:].lstrip()
        elif rest[:1] == b",":
            rest = rest[1:].lstrip()
        else:
            break
    if _ALTER_TABLE.match(text) and (renamed := _RENAMED.search(text)):
        names.append(_ident(renamed[1]) if renamed[1] else None)  # ALTER TABLE a RENAME TO b
    return names


def _layout_as_read(data: bytes) -> None:
    """A format description inside BINLOG must describe the layout this check reads
    (19-byte headers, 6-byte table ids): another one would have the server read what the
    check did not."""
    # body: binlog version (2), server version (50), created (4), header length (1), then
    # each event type's post-header length (TABLE_MAP's is the 19th, rows' the 23rd…)
    at = 19 + 2 + 50 + 4
    try:
        header, table_map = data[at], data[at + 1 + TABLE_MAP - 1]
        rows = [data[at + 1 + t - 1] for t in (23, 24, 25)]
    except IndexError:
        raise Unsafe("a format description event that is cut short") from None
    if header != 19 or table_map != 8 or any(r != 8 for r in rows):
        raise Unsafe("a format description with another event layout than the check reads")


def _table_map(data: bytes) -> tuple[int, bytes]:
    """(table id, database) of a TABLE_MAP event (6-byte ids, as every server since 5.1
    writes them)."""
    try:
        table_id = int.from_bytes(data[19:25], "little")
        db_len = data[27]
        db = data[28:28 + db_len]
        if len(db) != db_len or data[28 + db_len] != 0:
            raise IndexError
    except IndexError:
        raise Unsafe("a table map event that is cut short") from None
    return table_id, db


def _shown(text: bytes) -> str:
    return repr(text[:80].decode("utf-8", "replace"))

