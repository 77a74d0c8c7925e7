"""A PostgreSQL server's globals in a backup (issue 21): roles, their attributes and
passwords, memberships, role settings and tablespaces, as `pg_dumpall --globals-only` writes
them.

They travel at the head of the backup's plain SQL, each line commented out as `-- G <line>`
(see globals_head), so that `psql -f backup.sql` on the same server leaves roles alone (no
password reset to the backup's) while the recipe for a new server stays two commands:

    awk '/^-- G/ {sub(/^-- G ?/, ""); print; n++; next} /^--|^$/ && !n {next} {exit}' \\
        backup.sql > globals.sql
    psql -f globals.sql postgres    # "role … already exists" for postgres: harmless

A restore with `roles = "create"` reads that head and creates the roles the database needs
that the server lacks — the roles its objects and grants name, and every role that is a
member of one of them (the application's login role usually owns nothing and is only a
member of a role that does) — with their LOGIN, passwords, settings and memberships. The
head is untrusted input like the rest of the file: it is parsed against the grammar
`pg_dumpall` writes, anything else is refused, and Safehold writes the SQL it runs itself.
Attributes that reach beyond one database (SUPERUSER, REPLICATION, BYPASSRLS, CREATEROLE)
are never given, nor settings only a superuser may set: the warning names them. A role
that exists is never altered, except by becoming a member of a role this restore created
when the backup says so; memberships are granted only in roles this restore created
(never in an existing, superuser or predefined role: one with CREATEROLE could grant
anything), and not when PostgreSQL 16's INHERIT/SET FALSE would make them narrower.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from shared.formats.pgscript import UnsafeScript
from worker.engines.globals_head import AWK, GlobalsHead, commented, statements

__all__ = ["GlobalsHead", "commented", "header", "parse", "plan"]

MAX_ROLES = 100_000
# what a restore never gives a role it creates (they reach beyond the database restored)
WITHHELD = ("SUPERUSER", "REPLICATION", "BYPASSRLS", "CREATEROLE", "CREATEDB")
_KEPT = {"LOGIN", "NOLOGIN", "INHERIT", "NOINHERIT", "NOCREATEDB",
         "NOSUPERUSER", "NOREPLICATION", "NOBYPASSRLS", "NOCREATEROLE"}
# settings that load code: never set on a role from a backup
_UNSAFE_SETTINGS = {"session_preload_libraries", "local_preload_libraries",
                    "shared_preload_libraries", "dynamic_library_path"}
_TOKEN = re.compile(r"""(?:\s|--[^\n]*)*(?:
    [Ee]'(?P<estring>(?:[^'\\]|''|\\\\)*)'
  | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
  | "(?P<qident>(?:[^"]|"")*)"
  | '(?P<string>(?:[^']|'')*)'
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?)
  | (?P<punct>[,;=.()])
)""", re.X | re.S)


_TRAILER = re.compile(r"(?:\s|--[^\n]*)*")


def header(role_passwords: bool) -> bytes:
    """The comment lines before the globals: what they are and how to use them by hand."""
    return ("--\n-- Safehold: this server's globals (roles, memberships, role settings, "
            "tablespaces) from\n-- pg_dumpall --globals-only"
            + ("" if role_passwords else " --no-role-passwords (the backup's role could "
               "not read\n-- the passwords)")
            + ", commented out as '-- G ' lines.\n-- To recreate them on a new server:"
            f"\n--   {AWK} THIS.sql > globals.sql\n--   psql -f globals.sql postgres\n--\n"
            ).encode()


@dataclass
class Role:
    name: str
    attributes: list[str] = field(default_factory=list)  # as written, in order
    password: str | None = None
    valid_until: str | None = None
    connection_limit: int | None = None
    settings: list[tuple[str | None, str, list[str]]] = field(default_factory=list)
    comment: str | None = None


@dataclass
class Membership:
    role: str
    member: str
    admin: bool = False
    limited: bool = False  # INHERIT FALSE or SET FALSE (PostgreSQL 16+)


@dataclass
class Globals:
    roles: dict[str, Role] = field(default_factory=dict)
    memberships: list[Membership] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # tablespaces, parameter grants…


class BadGlobals(Exception):
    """The head holds what pg_dumpall does not write (`parse` names the head's line)."""


def _bad(what: str) -> BadGlobals:
    return BadGlobals(what)


def _normalize(kind: str, value: str) -> tuple[str, str]:
    if kind == "ident":
        return kind, value.lower()
    if kind == "qident":
        return "ident", value.replace('""', '"')
    if kind == "string":
        return kind, value.replace("''", "'")
    if kind == "estring":  # pg_dumpall's E'' doubles backslashes and quotes, nothing else
        return "string", re.sub(r"''|\\\\", lambda m: m[0][0], value)
    return kind, value


def _statements(lines: list[bytes]) -> Iterable[list[tuple[str, str]]]:
    """The head's statements, tokenized; pg_dump's `\\restrict` bracket lines skipped (any
    other backslash is text the tokenizer refuses)."""
    return statements(lines, _TOKEN, _TRAILER, _normalize, _bad,
                      skip=lambda line: bool(re.fullmatch(r"\\(un)?restrict [A-Za-z0-9]+\s*",
                                                          line)))


def _words(st: list[tuple[str, str]], n: int) -> list[str]:
    return [v.upper() if k == "ident" else "" for k, v in st[:n]]


def parse(lines: list[bytes], first_line: int = 1) -> Globals:
    """The head's statements, checked against the grammar pg_dumpall writes; anything
    else is refused (UnsafeScript naming the head's first line)."""
    try:
        return _parse(lines)
    except BadGlobals as exc:
        raise UnsafeScript(first_line, f"the backup's globals hold {exc}; only what "
                           "pg_dumpall --globals-only writes is accepted",
                           code="unsafe_backup") from None


def _parse(lines: list[bytes]) -> Globals:
    g = Globals()
    for st in _statements(lines):
        w = _words(st, 4)
        if w[0] in ("SET", "RESET"):
            continue  # the session settings pg_dumpall writes first
        if w[:2] == ["CREATE", "ROLE"] and len(st) == 3 and st[2][0] == "ident":
            if len(g.roles) >= MAX_ROLES:
                raise _bad(f"more than {MAX_ROLES} roles")
            g.roles.setdefault(st[2][1], Role(st[2][1]))
        elif w[:2] == ["ALTER", "ROLE"] and len(st) > 3 and st[2][0] == "ident":
            _alter_role(g, _known(g, st[2][1]), st[3:])
        elif w[:3] == ["COMMENT", "ON", "ROLE"] and len(st) == 6 and st[3][0] == "ident" \
                and _words(st[4:5], 1) == ["IS"] and st[5][0] == "string":
            _known(g, st[3][1]).comment = st[5][1]
        elif w[0] == "GRANT" and len(st) >= 4 and st[1][0] == "ident" and \
                _words(st[2:3], 1) == ["TO"] and st[3][0] == "ident":
            _membership(g, st)
        elif "TABLESPACE" in _words(st, 12) or w[:2] == ["SECURITY", "LABEL"] or \
                (w[0] in ("GRANT", "REVOKE") and "PARAMETER" in _words(st, 12)):
            g.left_out.append(" ".join(v for _, v in st[:6])[:120])
        else:
            raise _bad(f"a statement it does not accept ({' '.join(v for _, v in st[:4])!r})")
    return g


def _known(g: Globals, name: str) -> Role:
    role = g.roles.get(name)
    if role is None:
        raise _bad(f"a statement about role {name!r} before its CREATE ROLE")
    return role


def _alter_role(g: Globals, role: Role, rest: list[tuple[str, str]]) -> None:
    w = _words(rest, 3)
    database: str | None = None
    if w[:2] == ["IN", "DATABASE"] and len(rest) > 3 and rest[2][0] == "ident":
        database, rest = rest[2][1], rest[3:]
        w = _words(rest, 1)
    if w[0] == "SET":
        _setting(role, database, rest[1:])
        return
    if w[0] != "WITH" or database is not None:
        raise _bad(f"an ALTER ROLE it does not accept (role {role.name!r})")
    i = 1
    while i < len(rest):
        kind, value = rest[i]
        word = value.upper() if kind == "ident" else ""
        if word == "PASSWORD" and i + 1 < len(rest):
            role.password = rest[i + 1][1] if rest[i + 1][0] == "string" else None
            i += 2
        elif word == "VALID" and _words(rest[i + 1:i + 2], 1) == ["UNTIL"] and \
                i + 2 < len(rest) and rest[i + 2][0] == "string":
            role.valid_until = rest[i + 2][1]
            i += 3
        elif word == "CONNECTION" and _words(rest[i + 1:i + 2], 1) == ["LIMIT"] and \
                i + 2 < len(rest) and rest[i + 2][0] == "number":
            role.connection_limit = int(float(rest[i + 2][1]))
            i += 3
        elif word in _KEPT or word in WITHHELD:
            role.attributes.append(word)
            i += 1
        else:
            raise _bad(f"a role attribute it does not know ({value[:40]!r})")


def _setting(role: Role, database: str | None, rest: list[tuple[str, str]]) -> None:
    """`name [. name] TO|= value [, value…]` of ALTER ROLE … SET."""
    name_parts: list[str] = []
    i = 0
    while i < len(rest) and rest[i][0] == "ident" and _words(rest[i:i + 1], 1)[0] != "TO":
        name_parts.append(rest[i][1])
        i += 1
        if i < len(rest) and rest[i] == ("punct", "."):
            i += 1
        else:
            break
    if not name_parts or i >= len(rest) or \
            not (rest[i] == ("punct", "=") or _words(rest[i:i + 1], 1) == ["TO"]):
        raise _bad(f"a role setting it cannot read (role {role.name!r})")
    values: list[str] = []
    for j, (kind, value) in enumerate(rest[i + 1:]):
        if j % 2 == 1:
            if (kind, value) != ("punct", ","):
                raise _bad(f"a role setting it cannot read (role {role.name!r})")
        elif kind in ("string", "number", "ident"):
            values.append(value)
        else:
            raise _bad(f"a role setting it cannot read (role {role.name!r})")
    name = ".".join(name_parts)
    if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?", name) or not values:
        raise _bad(f"a role setting it cannot read (role {role.name!r})")
    role.settings.append((database, name, values))


def _membership(g: Globals, st: list[tuple[str, str]]) -> None:
    """`GRANT role TO member [WITH ADMIN OPTION | WITH ADMIN|INHERIT|SET TRUE|FALSE, …]
    [GRANTED BY r]` (PostgreSQL 16+ writes the option list)."""
    role, member = st[1][1], st[3][1]
    admin = limited = False
    words = [v.upper() if k == "ident" else v for k, v in st[4:]]
    if words[:1] == ["WITH"]:
        opts = words[1:]
        while True:
            if opts[:2] == ["ADMIN", "OPTION"]:
                admin, opts = True, opts[2:]
            elif len(opts) >= 2 and opts[0] in ("ADMIN", "INHERIT", "SET") and \
                    opts[1] in ("TRUE", "FALSE"):
                if opts[0] == "ADMIN":
                    admin = opts[1] == "TRUE"
                elif opts[1] == "FALSE":
                    limited = True  # no INHERIT or no SET: narrower than a plain grant
                opts = opts[2:]
            else:
                raise _bad(f"a membership it cannot read ({role!r} to {member!r})")
            if opts[:1] != [","]:
                break
            opts = opts[1:]
        words = opts
    if words[:2] == ["GRANTED", "BY"] and len(words) == 3:
        words = []
    if words:
        raise _bad(f"a membership it cannot read ({role!r} to {member!r})")
    # pg_dumpall never creates predefined roles (pg_*) but writes memberships in them
    if (role not in g.roles and not role.startswith("pg_")) or member not in g.roles:
        raise _bad(f"a membership of a role it never created ({role!r} to {member!r})")
    g.memberships.append(Membership(role, member, admin, limited))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """One line whatever the text (the restore keeps psql's line numbers the file's)."""
    if not any(c in text for c in "\n\r\\"):
        return "'" + text.replace("'", "''") + "'"
    escaped = text.replace("\\", "\\\\").replace("'", "''").replace("\n", "\\n") \
        .replace("\r", "\\r")
    return "E'" + escaped + "'"


@dataclass
class Plan:
    sql: str = ""
    created: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _needed(g: Globals, referenced: Iterable[str], existing: Collection[str]) -> set[str]:
    """The roles the dump names, and the members of those this restore creates: members
    of a role reach the database only through a membership this restore grants, i.e. in
    a role it creates (an existing role's members are not followed)."""
    referenced = set(referenced)  # read twice below: a generator would be empty the second time
    members: dict[str, set[str]] = {}
    for grant in g.memberships:
        members.setdefault(grant.role, set()).add(grant.member)
    needed, todo = set(referenced), list(referenced)
    while todo:
        parent = todo.pop()
        if parent in existing:
            continue
        for member in members.get(parent, ()):
            if member not in needed:
                needed.add(member)
                todo.append(member)
    return needed


def plan(g: Globals, referenced: Iterable[str], existing: Collection[str], *,
         database: str, superuser: bool,
         settable: Callable[[str], bool] = lambda name: False) -> Plan:
    """The SQL (one line) creating the roles the database needs that the server lacks.

    `referenced`: the roles the dump names; `existing`: the server's roles among every name
    involved; `settable(name)`: whether any user may set that setting (only those are
    given to a role)."""
    create = sorted(r for r in _needed(g, referenced, existing) if r not in existing)
    p = Plan(created=create)
    out: list[str] = []
    withheld: dict[str, list[str]] = {}
    for name in create:
        role = g.roles.get(name) or Role(name, ["NOLOGIN"])  # named, not described
        attrs = [a for a in role.attributes if a not in WITHHELD]
        for a in role.attributes:
            if a in WITHHELD:
                withheld.setdefault(a, []).append(name)
        if not any(a in ("LOGIN", "NOLOGIN") for a in attrs):
            attrs.append("NOLOGIN")
        if role.connection_limit is not None:
            attrs.append(f"CONNECTION LIMIT {role.connection_limit}")
        if role.password is not None:
            attrs.append(f"PASSWORD {quote_literal(role.password)}")
        if role.valid_until is not None:
            attrs.append(f"VALID UNTIL {quote_literal(role.valid_until)}")
        out.append(f"CREATE ROLE {quote_ident(name)} WITH {' '.join(attrs)};")
        if not superuser:  # to own its objects (PostgreSQL 15) the restorer is a member
            out.append(f"GRANT {quote_ident(name)} TO CURRENT_USER;")
    created = set(create)
    left: list[str] = []
    for name in create:
        if (described := g.roles.get(name)) is None:
            continue
        for db, setting, values in described.settings:
            if db is not None and db != database:
                continue
            if setting in _UNSAFE_SETTINGS or not settable(setting):
                left.append(f"{setting} of {name}")
                continue
            where = f" IN DATABASE {quote_ident(db)}" if db else ""
            out.append(f"ALTER ROLE {quote_ident(name)}{where} SET {setting} TO "
                       + ", ".join(quote_literal(v) for v in values) + ";")
        if described.comment is not None:
            out.append(f"COMMENT ON ROLE {quote_ident(name)} IS "
                       f"{quote_literal(described.comment)};")
    skipped: list[str] = []
    for m in g.memberships:
        if m.role not in created:
            if m.member in created:  # an existing, superuser or predefined role: never
                skipped.append(f"{m.role} to {m.member}")
            continue  # between roles that exist: left as the server has it
        if m.limited:
            skipped.append(f"{m.role} to {m.member} (INHERIT/SET FALSE)")
            continue
        out.append(f"GRANT {quote_ident(m.role)} TO {quote_ident(m.member)}"
                   + (" WITH ADMIN OPTION" if m.admin else "") + ";")
    for attr, names in sorted(withheld.items()):
        p.warnings.append(f"{attr} not given to {', '.join(names)} (give it by hand if "
                          "the new server needs it)")
    if skipped:
        p.warnings.append("memberships not granted (only memberships in roles this restore "
                          "created are; grant these by hand if they are wanted): "
                          + "; ".join(skipped[:50]))
    if left:
        p.warnings.append("role settings left out (only settings any user may set are "
                          "restored): " + "; ".join(left[:50]))
    if g.left_out:
        p.warnings.append("left out of the globals (restore them by hand): "
                          + "; ".join(g.left_out[:50]))
    p.sql = " ".join(out)
    return p
