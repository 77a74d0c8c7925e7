"""The parts of a plain pg_dump that belong to some named tables (issue 25's `tables`).

A one-table restore reads the whole backup stream once, through `PgScriptGuard` (which
knows where statements, strings and COPY data begin and end), and passes on only:

- for a table that exists in the live database (`data`): its `TABLE DATA` (the COPY block)
  and the `SEQUENCE SET` of the sequences it owns (names from the live catalog);
- for a table the live database lacks (`create`): every section that makes it as dumped —
  the table, its owned sequences (serial or identity), defaults, data, sequence values,
  constraints, indexes, triggers, rules, row security, policies, grants and comments —
  and the foreign keys of other live tables that pointed at it (when they are gone).

pg_dump's section comments (`-- Name: …; Type: …`) only delimit sections and rule out
those that can never matter; what a section *does* is read from its statements, and a
kept section whose statements touch anything else makes the restore refuse (nothing is
sent for it: a statement is checked before the line that ends it goes to psql). A header
inside a string or function body is no header: headers count only between statements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.errors import BadRequest

Rel = tuple[str, str]  # (schema, name), unquoted
HOLD_MAX = 4 << 20  # SQL text of an undecided section kept at most
RAW_MAX = 8 << 10  # a statement's first bytes, enough to read what it is about

_HEADER = re.compile(rb"^-- (?:Data for )?Name: (?P<tag>.*); Type: (?P<type>[A-Z][A-Z ]*); "
                     rb"Schema: (?P<schema>.*?); Owner: ")
# sections that may belong to a table the live database still has / lacks
DATA_TYPES = frozenset({b"TABLE DATA", b"SEQUENCE SET"})
CREATE_TYPES = DATA_TYPES | {
    b"TABLE", b"SEQUENCE", b"SEQUENCE OWNED BY", b"DEFAULT", b"CONSTRAINT",
    b"CHECK CONSTRAINT", b"FK CONSTRAINT", b"INDEX", b"TRIGGER", b"POLICY", b"ROW SECURITY",
    b"ACL", b"COMMENT"}  # never rules (their actions reach any table) nor partitions

# identifiers as pg_dump prints them: lowercase plain, or double-quoted
_ID = r'(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+")'
_Q = rf"(?P<s>{_ID})\.(?P<n>{_ID})"
_LIT = r"E?'(?:[^'\\]|''|\\.)*'"
_INT = r"-?\d+"
_EVENTS = rf"(?:INSERT|DELETE|TRUNCATE|UPDATE(?: OF {_ID}(?:, {_ID})*)?)"
# every statement a kept section may hold, whole (whitespace collapsed, no comments): the
# relation each is about sits at a fixed place, never found by skipping ahead
_FORMS: list[tuple[str, re.Pattern[str]]] = [(kind, re.compile(rx, re.S)) for kind, rx in [
    ("neutral", r"SET (?:statement_timeout|lock_timeout|idle_in_transaction_session_timeout|"
                r"client_encoding|standard_conforming_strings|check_function_bodies|xmloption|"
                r"client_min_messages|row_security|default_tablespace|"
                r"default_table_access_method|default_with_oids) = (?:'[A-Za-z0-9_ -]*'|"
                r"[A-Za-z0-9_]+);"),
    ("neutral", r"SELECT pg_catalog\.set_config\('search_path', '', false\);"),
    ("create", rf"CREATE (?:UNLOGGED )?TABLE {_Q} \(.*\);"),
    ("copy", rf"COPY {_Q} \((?P<cols>{_ID}(?:, {_ID})*)\) FROM stdin;"),
    ("owner", rf"ALTER (?:TABLE|SEQUENCE) (?:ONLY )?{_Q} OWNER TO {_ID};"),
    ("table", rf"ALTER TABLE ONLY {_Q} ALTER COLUMN {_ID} SET DEFAULT .*;"),
    ("table", rf"ALTER TABLE (?:ONLY )?{_Q} (?:ENABLE|FORCE) ROW LEVEL SECURITY;"),
    ("table", rf"ALTER TABLE (?:ONLY )?{_Q} REPLICA IDENTITY (?:FULL|NOTHING|DEFAULT|"
              rf"USING INDEX {_ID});"),
    ("identity", rf"ALTER TABLE (?:ONLY )?{_Q} ALTER COLUMN {_ID} ADD GENERATED "
                 rf"(?:ALWAYS|BY DEFAULT) AS IDENTITY \( SEQUENCE NAME "
                 rf"(?P<qs>{_ID})\.(?P<qn>{_ID})(?: [A-Z]+(?: [A-Z]+)*(?: {_INT})?)* \);"),
    ("fk", rf"ALTER TABLE (?:ONLY )?{_Q} ADD CONSTRAINT (?P<c>{_ID}) FOREIGN KEY "
           rf"\({_ID}(?:, {_ID})*\) REFERENCES (?P<rs>{_ID})\.(?P<rn>{_ID})"
           rf"\({_ID}(?:, {_ID})*\)(?: MATCH (?:FULL|SIMPLE))?"
           r"(?: ON (?:DELETE|UPDATE) (?:CASCADE|RESTRICT|SET NULL|SET DEFAULT|NO ACTION)"
           rf"(?: \({_ID}(?:, {_ID})*\))?)*(?: (?:NOT )?DEFERRABLE)?"
           r"(?: INITIALLY (?:DEFERRED|IMMEDIATE))?(?: NOT VALID)?;"),
    ("table", rf"ALTER TABLE (?:ONLY )?{_Q} ADD CONSTRAINT {_ID} (?:PRIMARY KEY|UNIQUE"
              r"(?: NULLS NOT DISTINCT)?|CHECK|EXCLUDE) .*;"),
    ("index", rf"CREATE (?:UNIQUE )?INDEX (?P<x>{_ID}) ON (?:ONLY )?{_Q} USING [a-z_]+ \(.*;"),
    ("table", rf"CREATE (?:CONSTRAINT )?TRIGGER {_ID} (?:BEFORE|AFTER|INSTEAD OF) "
              rf"{_EVENTS}(?: OR {_EVENTS})* ON {_Q} .*;"),
    ("table", rf"CREATE POLICY {_ID} ON {_Q}(?: AS (?:PERMISSIVE|RESTRICTIVE))?"
              rf"(?: FOR (?:ALL|SELECT|INSERT|UPDATE|DELETE))?(?: TO .*| USING .*| WITH "
              r"CHECK .*)?;"),
    ("newseq", rf"CREATE SEQUENCE {_Q}(?: AS [a-z]+)?(?: [A-Z]+(?: [A-Z]+)*(?: {_INT})?)*;"),
    ("owned", rf"ALTER SEQUENCE {_Q} OWNED BY (?P<os>{_ID})\.(?P<on>{_ID})\.{_ID};"),
    ("setval", rf"SELECT pg_catalog\.setval\('(?P<lit>(?:[^']|'')*)', (?P<v>{_INT}), "
               r"(?P<b>true|false)\);"),
    ("table", rf"(?:GRANT|REVOKE) [A-Z, ()a-z_\"]+ ON TABLE {_Q} (?:TO|FROM) [^;]*;"),
    ("sequence", rf"(?:GRANT|REVOKE) [A-Z, ]+ ON SEQUENCE {_Q} (?:TO|FROM) [^;]*;"),
    ("table", rf"COMMENT ON TABLE {_Q} IS {_LIT};"),
    ("table", rf"COMMENT ON COLUMN {_Q}\.{_ID} IS {_LIT};"),
    ("table", rf"COMMENT ON (?:CONSTRAINT|TRIGGER|POLICY) {_ID} ON {_Q} IS {_LIT};"),
    ("sequence", rf"COMMENT ON SEQUENCE {_Q} IS {_LIT};"),
    ("comment_index", rf"COMMENT ON INDEX {_Q} IS {_LIT};"),
]]
# words that never belong in the statements above outside quotes and literals (the guard's
# view of the statement: strings blanked, quoted names as X)
_FOREIGN = re.compile(rb"(?i)\b(?:INHERITS|PARTITION|ATTACH|DETACH|DROP|RENAME|DISABLE|"
                      rb"NO\s+INHERIT|SET\s+SCHEMA)\b")


def unquote(token: str) -> str:
    return token[1:-1].replace('""', '"') if token.startswith('"') else token


def parse_literal_name(lit: str) -> Rel | None:
    """`public.seq` or `"My".seq` as setval's text argument names it."""
    m = re.fullmatch(_Q, lit.replace("''", "'"))
    return (unquote(m["s"]), unquote(m["n"])) if m else None


def parse_table_name(name: str) -> Rel | None:
    """`schema.table` as an operator names it (plain identifiers, taken literally)."""
    parts = name.split(".")
    if len(parts) != 2 or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", p)
                                  for p in parts):
        return None
    return parts[0], parts[1]


def quoted(rel: Rel) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in rel)


class RefusedSection(BadRequest):
    code = "unsafe_backup"


@dataclass
class Statement:
    """What one statement is about: its relation and, for some, more."""

    # neutral | create | copy | owner | table | identity | fk | index | sequence | owned
    # | setval | comment_index | other
    kind: str
    rel: Rel | None = None
    by: Rel | None = None  # ALTER SEQUENCE … OWNED BY this table
    index: Rel | None = None  # CREATE INDEX: the index made
    fk: tuple[str, Rel] | None = None  # ADD CONSTRAINT c FOREIGN KEY … REFERENCES t
    identity: Rel | None = None  # ADD GENERATED … AS IDENTITY (SEQUENCE NAME s)
    columns: list[str] = field(default_factory=list)  # COPY's column list
    setval: tuple[int, bool] | None = None


def classify(raw: str, head: bytes = b"") -> Statement:
    """The statement, whole: one of _FORMS or `other`. `head`: the guard's view of it
    (literals blanked), where words that would change something else are looked for."""
    text = re.sub(r"\s+", " ", raw).strip()
    for kind, rx in _FORMS:
        m = rx.fullmatch(text)
        if not m:
            continue
        if kind == "neutral":
            return Statement("neutral")
        if kind not in ("setval",) and _FOREIGN.search(head):
            return Statement("other")
        if kind == "setval":
            return Statement("sequence", parse_literal_name(m["lit"]),
                             setval=(int(m["v"]), m["b"] == "true"))
        st = Statement(kind, (unquote(m["s"]), unquote(m["n"])))
        if kind == "owned":
            st.kind, st.by = "owned", (unquote(m["os"]), unquote(m["on"]))
        elif kind == "index":
            st.index = (unquote(m["s"]), unquote(m["x"]))
        elif kind == "fk":
            st.fk = (unquote(m["c"]), (unquote(m["rs"]), unquote(m["rn"])))
        elif kind == "identity":
            st.identity = (unquote(m["qs"]), unquote(m["qn"]))
        elif kind == "copy":
            st.columns = [unquote(c) for c in re.findall(_ID, m["cols"])]
        elif kind == "owner":
            st.kind = "owner"
        return st
    return Statement("other")


@dataclass
class Selection:
    """What to keep: `data` tables exist live (their rows are replaced), `create` tables
    do not (they are made as dumped). `sequences`: live sequences the data tables own;
    `live_tables`/`live_fks`: where the foreign keys that pointed at a created table
    can go back (the referencing table is there, the constraint is not)."""

    data: set[Rel]
    create: set[Rel]
    sequences: set[Rel] = field(default_factory=set)
    live_tables: set[Rel] = field(default_factory=set)
    live_fks: set[tuple[str, str, str]] = field(default_factory=set)


_PREAMBLE, _DROP, _PENDING, _KEEP = range(4)
_UNDECIDED = None
DEFERRED_MAX = 1 << 20  # the sequences' setval held back for the end


class TableCut:
    """Routes the guard's output. The guard calls `header` for each section comment met
    between statements, `line_start` / `capture` / `route` for every SQL line,
    `statement_start` and `statement` as statements begin and end, and `copy_data` for
    COPY blocks; `finish` checks every table got what it needs.

    A statement of a kept section must begin its line, hold no comment, and be one of the
    whole shapes pg_dump writes for a table (`classify`); the COPY header and the setval
    calls are not passed on as written but written anew from what was parsed."""

    def __init__(self, sel: Selection) -> None:
        self.sel = sel
        self.owned: set[Rel] = set(sel.sequences)  # sequences of the kept tables
        self.indexes: set[Rel] = set()
        self.created: set[Rel] = set()
        self.loaded: set[Rel] = set()  # tables whose COPY block was passed on
        self.incoming_fks: list[str] = []  # foreign keys put back on other tables
        # the sequences' setval, sent after every check: a sequence change is the one thing
        # a rolled back transaction does not undo
        self.deferred: list[bytes] = []
        self._deferred_size = 0
        self.sections = 0
        self._state = _PREAMBLE
        self._type = b""
        self._held: list[bytes] = []
        self._held_size = 0
        self._release: bool | None = False  # the preamble: pass what is held, or drop it
        self._seq: Rel | None = None  # a SEQUENCE section's sequence, owner unknown yet
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._line_bytes = b""
        self._in_statement = False
        self._lines_in_statement = 0
        self._replace: bytes | None = None  # the line written anew (COPY, setval)
        self._last_raw = b""
        self._line = 0

    # ------------------------------------------------------------------ guard hooks
    def header(self, stripped: bytes) -> None:
        m = _HEADER.match(stripped)
        if m is None:
            return  # another comment: the section goes on
        if not (self._state == _PENDING and self._seq is not None
                and m["type"] == b"SEQUENCE OWNED BY"):
            self._held, self._held_size, self._seq = [], 0, None
        self._type = m["type"]
        allowed = CREATE_TYPES if self.sel.create else DATA_TYPES
        self._state = _PENDING if self._type in allowed else _DROP

    def line_start(self, at_boundary: bool, line_no: int) -> None:
        self._line = line_no
        if self._in_statement:
            self._lines_in_statement += 1

    def capture(self, line: bytes) -> None:
        """The line under way (a statement's text runs from its start)."""
        self._line_bytes = line
        if self._in_statement and self._state != _DROP and self._raw_size < RAW_MAX:
            self._raw.append(line)
            self._raw_size += len(line)

    def statement_start(self, first_on_line: bool) -> None:
        self._in_statement = True
        self._lines_in_statement = 1
        self._raw, self._raw_size = [self._line_bytes], len(self._line_bytes)
        if self._state != _DROP and not first_on_line:
            self._refuse("a statement that does not begin its line")

    def statement(self, head: bytes, commented: bool) -> None:
        """A statement ended (decided before the line that ends it is routed)."""
        self._in_statement = False
        if self._state == _DROP:
            return
        if commented:
            self._refuse("a comment inside a statement of a restored table's section")
        if self._raw_size >= RAW_MAX and self._state != _PREAMBLE:
            self._refuse(f"a statement longer than {RAW_MAX >> 10} KiB")
        self._last_raw = b"".join(self._raw)
        st = classify(self._last_raw.decode("utf-8", "replace"), head)
        one_line = self._lines_in_statement == 1
        self._raw, self._raw_size = [], 0
        if self._state == _PREAMBLE:  # settings pass, anything else never does
            self._release = True if st.kind == "neutral" else None
            return
        if st.kind == "neutral":
            return
        ours = self._ours(st)
        if ours and st.kind in ("create", "table", "index") and not head.lstrip().upper(
                ).startswith((b"CREATE TRIGGER", b"CREATE CONSTRAINT", b"CREATE POLICY")):
            self._calls_allowed(head, text_of(self._last_raw))
        if ours and st.kind in ("copy", "sequence") and (st.columns or st.setval):
            if not one_line:
                self._refuse("a COPY or setval over several lines")
            self._rewrite(st)
        if self._state == _KEEP:
            if not ours:
                self._refuse(f"a {self._type.decode()} section of a restored table holds a "
                             "statement about something else")
        elif ours:
            self._state = _KEEP
            self.sections += 1
        elif ours is not _UNDECIDED:
            self._state = _DROP
            self._held, self._held_size = [], 0

    def route(self, line: bytes) -> bytes:
        """What of this line goes to psql (with what was held for it)."""
        if self._replace is not None:
            line, self._replace = self._replace, None
        if self._state == _KEEP:
            if self._held:
                line = b"".join(self._held) + line
                self._held, self._held_size = [], 0
            return line
        if self._state == _DROP:
            return b""
        self._held.append(line)
        self._held_size += len(line)
        if self._release is not False:
            out = b"".join(self._held) if self._release else b""
            self._release = False
            self._held, self._held_size = [], 0
            return out
        if self._held_size > HOLD_MAX:
            self._refuse(f"a section longer than {HOLD_MAX >> 20} MiB before a statement "
                         "says what it is about")
        return b""

    def copy_data(self, piece: bytes) -> bytes:
        return piece if self._state == _KEEP else b""

    def finish(self) -> None:
        sel = self.sel
        if missing := sorted(sel.create - self.created):
            raise RefusedSection("the backup does not create " + ", ".join(
                f"{s}.{n}" for s, n in missing) + ": nothing was changed",
                code="table_missing")
        if missing := sorted((sel.data | sel.create) - self.loaded):
            raise RefusedSection("the backup holds no data for " + ", ".join(
                f"{s}.{n}" for s, n in missing) + ": nothing was changed",
                code="table_missing")

    # ------------------------------------------------------------------ decisions
    def _rewrite(self, st: Statement) -> None:
        """COPY and setval as Safehold writes them, from what was parsed."""
        assert st.rel is not None
        if st.columns:
            cols = ", ".join('"' + c.replace('"', '""') + '"' for c in st.columns)
            self._replace = f"COPY {quoted(st.rel)} ({cols}) FROM stdin;\n".encode()
            return
        assert st.setval is not None
        name = quoted(st.rel).replace("'", "''")
        call = (f"SELECT pg_catalog.setval('{name}', {st.setval[0]}, "
                f"{'true' if st.setval[1] else 'false'});\n").encode()
        self._deferred_size += len(call)
        if self._deferred_size > DEFERRED_MAX:
            self._refuse("more sequence values than any table owns")
        self.deferred.append(call)
        self._replace = b"\n"

    def _ours(self, st: Statement) -> bool | None:
        """Whether the statement is about the tables restored (None: not known yet)."""
        sel, t, rel = self.sel, self._type, st.rel
        data_section = t in DATA_TYPES
        if st.kind == "copy":
            if t != b"TABLE DATA" or rel is None or rel not in sel.data | sel.create \
                    or rel in self.loaded:
                return False
            self.loaded.add(rel)
            return True
        # sequences made by this restore (a live table's are only ever set, never defined)
        made = self.owned - sel.sequences
        if st.kind == "sequence":  # setval, ALTER/GRANT/COMMENT ON SEQUENCE: its own only
            if st.setval is not None:
                return t == b"SEQUENCE SET" and rel in self.owned
            return not data_section and rel in made
        if st.kind == "newseq":  # made here (a live one of that name fails the restore)
            if (self._state == _PENDING and t == b"SEQUENCE" and self._seq is None
                    and sel.create and rel is not None):
                self._seq = rel  # ours if its OWNED BY names a created table
                return _UNDECIDED
            return False
        if data_section:
            return False
        if st.kind == "owned":
            if st.by in sel.create and rel is not None and rel == self._seq:
                self.owned.add(rel)
                return True
            return False
        if st.kind == "comment_index":
            return rel in self.indexes
        if st.kind == "owner" and rel is not None and rel == self._seq:
            return True if rel in made else _UNDECIDED  # a sequence's owner
        if st.kind == "fk" and st.fk is not None and rel not in sel.create:
            con, ref = st.fk
            if ref in sel.create and rel in sel.live_tables and rel is not None \
                    and (rel[0], rel[1], con) not in sel.live_fks:
                self.incoming_fks.append(f"{rel[0]}.{rel[1]}.{con}")
                return True
            return False
        if rel is None or rel not in sel.create:
            return False
        if st.identity is not None:
            self.owned.add(st.identity)
        if st.index is not None:
            self.indexes.add(st.index)
        if st.kind == "create":
            self.created.add(rel)
        return st.kind in ("create", "table", "owner", "identity", "fk", "index")

    def _calls_allowed(self, head: bytes, raw: str) -> None:
        """A re-created table's definition runs while its rows load (defaults, checks,
        generated columns, index expressions): it may call only functions without side
        effects, and nextval only of a sequence made in this restore."""
        text = _MADE.sub("", head.decode("utf-8", "replace"), count=1)  # the table's name
        for name in _CALL.findall(text):
            fn = name.lower().removeprefix("pg_catalog.")
            if fn in _PURE or fn in _TYPE_WORDS:
                continue
            if fn == "nextval":
                seqs = [parse_literal_name(m) for m in _NEXTVAL.findall(raw)]
                if seqs and all(s in self.owned for s in seqs):
                    continue
            self._refuse(f"the backup's definition of the table calls {name}(), which a "
                         "tables restore does not run (restore the backup beside the live "
                         "database, into_database, and copy the table from there)")

    def _refuse(self, what: str) -> None:
        raise RefusedSection(f"line {self._line}: {what}; refused, nothing was changed")


def text_of(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


# `name(` outside literals and quoted names (the guard's head blanks those)
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?)\s*\(")
_MADE = re.compile(r"^\s*CREATE\s+(?:UNLOGGED\s+)?TABLE\s+\S+\s*", re.I)
_NEXTVAL = re.compile(r"nextval\('((?:[^']|'')*)'::regclass\)")
# words before a parenthesis that are syntax or a type's size, never a call
_TYPE_WORDS = frozenset({
    "numeric", "decimal", "varchar", "varying", "char", "character", "bit", "varbit",
    "time", "timestamp", "timestamptz", "timetz", "interval", "float", "check", "key",
    "unique", "in", "any", "all", "some", "array", "row", "using", "with", "include",
    "exclude", "as", "not", "and", "or", "on", "default", "distinct", "btree", "hash",
    "gist", "gin", "spgist", "brin", "where", "by", "is", "then", "else", "when", "case"})
# side-effect-free functions a definition commonly uses
_PURE = frozenset({
    "length", "char_length", "character_length", "octet_length", "lower", "upper", "btrim",
    "ltrim", "rtrim", "trim", "substring", "substr", "left", "right", "abs", "round",
    "floor", "ceil", "ceiling", "coalesce", "nullif", "greatest", "least", "array_length",
    "cardinality", "jsonb_typeof", "json_typeof", "date_trunc", "date_part", "extract",
    "now", "clock_timestamp", "statement_timestamp", "transaction_timestamp",
    "gen_random_uuid", "md5", "position", "strpos", "replace", "concat", "concat_ws",
    "to_tsvector", "regexp_replace", "mod", "sign", "trunc", "num_nonnulls", "num_nulls"})
