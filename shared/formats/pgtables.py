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
    b"RULE", b"ACL", b"COMMENT", b"TABLE ATTACH"}

_ID = r'(?:[A-Za-z_\x80-\uffff][\w$\x80-\uffff]*|"(?:[^"]|"")+")'
_Q = rf"(?P<s>{_ID})\.(?P<n>{_ID})"
_WS = r"\s+"
_FORMS: list[tuple[str, re.Pattern[str]]] = [(kind, re.compile(rx, re.S | re.I)) for kind, rx in [
    ("create", rf"CREATE{_WS}(?:UNLOGGED{_WS})?TABLE{_WS}{_Q}[\s(]"),
    ("alter", rf"ALTER{_WS}TABLE{_WS}(?:ONLY{_WS})?{_Q}\s"),
    ("copy", rf"COPY{_WS}{_Q}[\s(]"),
    ("index", rf"CREATE{_WS}(?:UNIQUE{_WS})?INDEX{_WS}(?P<x>{_ID}){_WS}ON{_WS}(?:ONLY{_WS})?"
              rf"{_Q}\s"),
    ("table", rf"CREATE{_WS}(?:CONSTRAINT{_WS})?TRIGGER{_WS}{_ID}\s.*?\sON{_WS}{_Q}\s"),
    ("table", rf"CREATE{_WS}POLICY{_WS}{_ID}{_WS}ON{_WS}{_Q}[\s;]"),
    ("table", rf"CREATE{_WS}RULE{_WS}{_ID}{_WS}AS{_WS}ON{_WS}\w+{_WS}TO{_WS}{_Q}\s"),
    ("sequence", rf"CREATE{_WS}SEQUENCE{_WS}{_Q}[\s;]"),
    ("owned", rf"ALTER{_WS}SEQUENCE{_WS}{_Q}{_WS}OWNED{_WS}BY{_WS}"
              rf"(?P<os>{_ID})\.(?P<on>{_ID})\.{_ID}\s*;"),
    ("sequence", rf"ALTER{_WS}SEQUENCE{_WS}{_Q}\s"),
    ("setval", rf"SELECT{_WS}pg_catalog\.setval\('(?P<lit>(?:[^']|'')*)',"),
    ("table", rf"(?:GRANT|REVOKE)\s[^;]*?\sON{_WS}TABLE{_WS}{_Q}\s"),
    ("sequence", rf"(?:GRANT|REVOKE)\s[^;]*?\sON{_WS}SEQUENCE{_WS}{_Q}\s"),
    ("table", rf"COMMENT{_WS}ON{_WS}(?:TABLE|COLUMN){_WS}{_Q}[\s.]"),
    ("sequence", rf"COMMENT{_WS}ON{_WS}SEQUENCE{_WS}{_Q}\s"),
    ("comment_index", rf"COMMENT{_WS}ON{_WS}INDEX{_WS}{_Q}\s"),
    ("table", rf"COMMENT{_WS}ON{_WS}(?:CONSTRAINT|TRIGGER|POLICY|RULE){_WS}{_ID}{_WS}ON{_WS}"
              rf"{_Q}\s"),
]]
_NEUTRAL = re.compile(r"(?is)\s*(?:SET\s|RESET\s|SELECT\s+pg_catalog\.set_config\()")
_FK = re.compile(rf"(?is)\sADD{_WS}CONSTRAINT{_WS}(?P<c>{_ID}){_WS}FOREIGN{_WS}KEY\s.*?"
                 rf"\sREFERENCES{_WS}{_Q}\s*\(")
_IDENTITY = re.compile(rf"(?is)\sADD{_WS}GENERATED\s.*?\sSEQUENCE{_WS}NAME{_WS}{_Q}\s")
_ATTACH = re.compile(rf"(?is)\sATTACH{_WS}PARTITION{_WS}{_Q}\s")


def unquote(token: str) -> str:
    return token[1:-1].replace('""', '"') if token.startswith('"') else token.lower()


def parse_literal_name(lit: str) -> Rel | None:
    """`public.seq` or `"My".seq` as setval's text argument names it."""
    m = re.fullmatch(_Q, lit.replace("''", "'"))
    return (unquote(m["s"]), unquote(m["n"])) if m else None


def parse_table_name(name: str) -> Rel | None:
    """`schema.table` as an operator names it (plain identifiers, taken literally)."""
    parts = name.split(".")
    if len(parts) != 2 or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", p)
                                  for p in parts):
        return None
    return parts[0], parts[1]


class RefusedSection(BadRequest):
    code = "unsafe_backup"


@dataclass
class Statement:
    """What one statement is about: its relation and, for some, more."""

    # create | copy | table | alter | index | sequence | owned | comment_index | neutral
    # | other
    kind: str
    rel: Rel | None = None
    by: Rel | None = None  # ALTER SEQUENCE … OWNED BY this table
    index: Rel | None = None  # CREATE INDEX: the index made
    fk: tuple[str, Rel] | None = None  # ADD CONSTRAINT c FOREIGN KEY … REFERENCES t
    identity: Rel | None = None  # ADD GENERATED … AS IDENTITY (SEQUENCE NAME s)
    attach: Rel | None = None  # ATTACH PARTITION t


def classify(raw: str) -> Statement:
    text = raw.lstrip()
    if _NEUTRAL.match(text):
        return Statement("neutral")
    for kind, rx in _FORMS:
        m = rx.match(text)
        if not m:
            continue
        if kind == "setval":
            return Statement("sequence", parse_literal_name(m["lit"]))
        st = Statement(kind, (unquote(m["s"]), unquote(m["n"])))
        if kind == "owned":
            st.by = (unquote(m["os"]), unquote(m["on"]))
        elif kind == "index":
            st.index = (unquote(m["s"]), unquote(m["x"]))
        elif kind == "alter":
            if fk := _FK.search(text):
                st.fk = (unquote(fk["c"]), (unquote(fk["s"]), unquote(fk["n"])))
            if ident := _IDENTITY.search(text):
                st.identity = (unquote(ident["s"]), unquote(ident["n"]))
            if att := _ATTACH.search(text):
                st.attach = (unquote(att["s"]), unquote(att["n"]))
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


class TableCut:
    """Routes the guard's output. The guard calls `header` for each section comment met
    between statements, `line_start` / `capture` / `route` for every SQL line,
    `statement_start` and `statement` as statements begin and end, and `copy_data` for
    COPY blocks; `finish` checks every table got what it needs."""

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
        self.sections = 0
        self._state = _PREAMBLE
        self._type = b""
        self._held: list[bytes] = []
        self._held_size = 0
        # the preamble: pass on what is held (a setting: True) or drop it (None)
        self._release: bool | None = False
        self._seq: Rel | None = None  # a SEQUENCE section's sequence, owner unknown yet
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._ends_on_line = 0
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
        self._line, self._ends_on_line = line_no, 0
        if at_boundary:
            self._raw, self._raw_size = [], 0

    def capture(self, line: bytes) -> None:
        """The raw text of the statement under way (its start is what matters)."""
        if self._state != _DROP and self._raw_size < RAW_MAX:
            self._raw.append(line[:RAW_MAX])
            self._raw_size += len(line)

    def statement_start(self) -> None:
        if self._ends_on_line and self._state != _DROP:
            self._refuse("a statement that begins on the line where another ends")

    def statement(self) -> None:
        """A statement ended (decided before the line that ends it is routed)."""
        self._ends_on_line += 1
        if self._state == _DROP:
            return
        st = classify(b"".join(self._raw).decode("utf-8", "replace"))
        self._raw, self._raw_size = [], 0
        if self._state == _PREAMBLE:  # settings pass, anything else never does
            self._release = True if st.kind == "neutral" else None
            return
        if st.kind == "neutral":
            return
        ours = self._ours(st)
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

    def route(self, line: bytes, *, set_line: bool = False) -> bytes:
        """What of this line goes to psql (with what was held for it)."""
        if self._state == _KEEP:
            if self._held:
                line = b"".join(self._held) + line
                self._held, self._held_size = [], 0
            if self._type == b"SEQUENCE SET":  # setval is never rolled back: it goes last
                self.deferred.append(line)
                return b""
            return line
        if self._state == _DROP:
            return line if set_line else b""  # a setting pg_dump put between sections
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
        if st.kind == "sequence":
            if rel in self.owned:
                return True
            if (self._state == _PENDING and t == b"SEQUENCE" and self._seq is None
                    and sel.create and rel is not None):
                self._seq = rel  # ours if its OWNED BY names a created table
                return _UNDECIDED
            return False
        if st.kind == "owned":
            if st.by in sel.create and rel is not None and rel == self._seq:
                self.owned.add(rel)
                return True
            return False
        if st.kind == "comment_index":
            return rel in self.indexes
        if data_section:
            return False
        if st.kind == "alter":
            if rel is not None and rel == self._seq:  # ALTER TABLE <sequence> OWNER TO …
                return True if rel in self.owned else _UNDECIDED
            if st.attach is not None:
                return st.attach in sel.create
            if st.fk is not None and rel not in sel.create:
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
        return st.kind in ("create", "table", "alter", "index")

    def _refuse(self, what: str) -> None:
        raise RefusedSection(f"line {self._line}: {what}; refused, nothing was changed")
