"""SQLite restores of some tables only (issue 25's `tables`): the checked backup file is
attached read-only, and in one `BEGIN IMMEDIATE` transaction on the live database each
named table gets the backup's rows (rowids kept) and its AUTOINCREMENT counter; a table
the live database lacks is created from the backup's definition with its indexes and
triggers. The live table's triggers are dropped for the load and put back as they were
(SQLite cannot switch them off), foreign keys are not enforced during the load and are
checked before COMMIT: a row pointing at nothing fails the restore, which then changes
nothing. The backup file is untrusted: each definition taken from it must be one
statement creating that table, an index on it or a trigger on it."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.errors import RestoreFailed

_DEFINES = {
    "table": r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{name}\s*\(",
    "index": r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?\S+\s+ON\s+{name}\s*\(",
    "trigger": r"CREATE\s+(?:TEMP\w*\s+)?TRIGGER\s+(?:IF\s+NOT\s+EXISTS\s+)?\S+\s.*?\bON\s+"
               r"{name}\s",
}


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _name_rx(name: str) -> str:
    """The ways a definition may spell a table's name."""
    forms = [re.escape(q(name)), re.escape(f"[{name}]"), re.escape(f"`{name}`")]
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", name):
        forms.append(re.escape(name) + r"(?![\w$])")
    return "(?:" + "|".join(forms) + ")"


def _definition(kind: str, name: str, sql: object) -> str:
    text = str(sql or "").strip()
    # one statement: sqlite3's execute refuses a second one (ProgrammingError, see load)
    if not re.match(_DEFINES[kind].format(name=_name_rx(name)), text, re.I | re.S):
        raise RestoreFailed(f"the backup's definition of {kind} on {name} is not a single "
                            f"CREATE {kind.upper()} of it; refused, nothing was changed",
                            database_unchanged=True, code="unsafe_backup")
    return text


def present(path: str, tables: Sequence[str]) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master "
                                           "WHERE type = 'table'")}
    finally:
        conn.close()
    return [t for t in tables if t in have]


def load(path: str, backup: Path, tables: Sequence[str], manifest: Mapping[str, object],
         timeout: float) -> list[str]:
    """Blocking: the restore itself; returns what it did, in words."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, uri=False)
    said: list[str] = []
    try:
        conn.execute("PRAGMA foreign_keys = OFF")  # checked before COMMIT instead
        conn.execute("ATTACH DATABASE ? AS src", (f"file:{backup}?mode=ro",))
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table in tables:
                said.append(_one(conn, table, manifest))
            bad = conn.execute("PRAGMA main.foreign_key_check").fetchall()
            touched = set(tables)
            parents = {r[0] for r in bad if r[0] in touched or r[2] in touched}
            if parents:
                first = next(r for r in bad if r[0] in touched or r[2] in touched)
                raise RestoreFailed(
                    f"after the load, table {first[0]} has a row (rowid {first[1]}) pointing "
                    f"at a row of {first[2]} that is not there; the restore was rolled back, "
                    "nothing was changed (restore those tables together, or fix the rows "
                    "first)", database_unchanged=True, code="foreign_key_violation")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.ProgrammingError as exc:  # a definition holding more than one statement
        raise RestoreFailed(f"the backup holds a definition SQLite would not run alone "
                            f"({exc}); refused, nothing was changed",
                            database_unchanged=True, code="unsafe_backup") from None
    except sqlite3.Error as exc:  # the transaction was rolled back
        locked = "locked" in str(exc) or "busy" in str(exc)
        raise RestoreFailed(
            (f"the database stayed locked by another connection for {timeout:g} s; nothing "
             "was changed" if locked else f"SQLite refused the restore ({exc}); it was "
             "rolled back, nothing was changed"), database_unchanged=True,
            code="lock_timeout" if locked else None) from None
    finally:
        conn.close()
    return said


def _one(conn: sqlite3.Connection, table: str, manifest: Mapping[str, object]) -> str:
    src = {(r[0], r[1]): r[2] for r in conn.execute(
        "SELECT type, name, sql FROM src.sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL",
        (table,))}
    definition = src.get(("table", table))
    if definition is None:
        raise RestoreFailed(f"the backup holds no table {table}; nothing was changed",
                            database_unchanged=True, code="table_missing")
    create = _definition("table", table, definition)
    live = conn.execute("SELECT sql FROM main.sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone()
    triggers = [r[0] for r in conn.execute(
        "SELECT sql FROM main.sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,))]
    if live is None:
        conn.execute(create)
        verb = "created as in the backup"
    else:
        for (name,) in conn.execute("SELECT name FROM main.sqlite_master WHERE type = "
                                    "'trigger' AND tbl_name = ?", (table,)).fetchall():
            conn.execute(f"DROP TRIGGER main.{q(name)}")
        conn.execute(f"DELETE FROM main.{q(table)}")
        verb = "rows replaced"
    cols = [r[1] for r in conn.execute(f"PRAGMA src.table_info({q(table)})")]
    rowid = not re.search(r"\)\s*WITHOUT\s+ROWID\s*$", create, re.I) and "rowid" not in cols
    names = ", ".join(([] if not rowid else ["rowid"]) + [q(c) for c in cols])
    conn.execute(f"INSERT INTO main.{q(table)} ({names}) SELECT {names} FROM src.{q(table)}")
    if live is None:  # its indexes and triggers, after its rows (as a dump would)
        for (kind, _name), sql in sorted(src.items()):
            if kind in ("index", "trigger"):
                conn.execute(_definition(kind, table, sql))
    else:
        for sql in triggers:
            conn.execute(sql)
    if conn.execute("SELECT 1 FROM src.sqlite_master WHERE name = 'sqlite_sequence'"
                    ).fetchone():
        seq = conn.execute("SELECT seq FROM src.sqlite_sequence WHERE name = ?",
                           (table,)).fetchone()
        if seq is not None:
            conn.execute("DELETE FROM main.sqlite_sequence WHERE name = ?", (table,))
            conn.execute("INSERT INTO main.sqlite_sequence (name, seq) VALUES (?, ?)",
                         (table, seq[0]))
    n = conn.execute(f"SELECT count(*) FROM main.{q(table)}").fetchone()[0]
    counts = manifest.get("counts")
    expect = counts.get(table) if isinstance(counts, dict) else None
    if isinstance(expect, int) and n != expect:
        raise RestoreFailed(f"{table} holds {n} rows after the load; the backup recorded "
                            f"{expect}: rolled back, nothing was changed",
                            database_unchanged=True, code="integrity_error")
    return f"{table}: {verb} ({n} rows)"
