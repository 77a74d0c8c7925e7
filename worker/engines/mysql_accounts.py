"""The accounts of a MySQL/MariaDB database in its backup (issue 21): the users and roles
that hold privileges on it (and every account granted one of those roles), how they log in,
their grants on this database, role grants and default roles.

Written at the head of the dump as `-- G ` comment lines (see globals_head), in statements
Safehold writes itself — `CREATE USER IF NOT EXISTS … IDENTIFIED VIA plugin USING 'hash'`
(MySQL: `IDENTIFIED WITH 'plugin' AS 'hash'`), `CREATE ROLE IF NOT EXISTS`, the server's
own `SHOW GRANTS` lines about this database — so that by hand on a new server:

    awk '/^-- G/ {sub(/^-- G ?/, ""); print; n++; next} /^--|^$/ && !n {next} {exit}' \\
        backup.sql > accounts.sql
    mysql app < backup.sql && mysql < accounts.sql

A restore reads the head as untrusted input: anything but those statements is refused,
and a grant must be about the backup's own database (it is given on the target's), so
nothing in a backup can reach beyond the database restored. Grants are applied after the
data (a column grant needs its table), and accounts are created then too: a load that
fails creates none. With the roles choice: none given and an account missing →
`roles_missing` before anything changes; "create" creates the missing accounts (with their
password hashes and plugins) and gives every grant of the backup; "skip" gives none.
Existing accounts are never altered (no password reset); a role grant is given only in a
role this restore created.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.formats.pgscript import UnsafeScript
from worker.engines.globals_head import statements

MAX_ACCOUNTS = 100_000
# privileges a grant on one database or one of its objects may carry
PRIVILEGES = {
    "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "REFERENCES", "INDEX", "ALTER",
    "CREATE TEMPORARY TABLES", "LOCK TABLES", "EXECUTE", "CREATE VIEW", "SHOW VIEW",
    "CREATE ROUTINE", "ALTER ROUTINE", "EVENT", "TRIGGER", "DELETE HISTORY",
    "ALL PRIVILEGES", "ALL", "GRANT OPTION", "SHOW CREATE ROUTINE"}
_MULTIWORD = sorted((p for p in PRIVILEGES if " " in p), key=len, reverse=True)
PLUGINS = {"mysql_native_password", "ed25519", "caching_sha2_password", "sha256_password",
           "parsec", "mysql_old_password"}
_TOKEN = re.compile(r"""(?:\s|--[ \t][^\n]*)*(?:
    `(?P<ident>(?:[^`]|``)*)`
  | '(?P<string>(?:[^'\\]|'')*)'
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<punct>[,;()@.*])
)""", re.X | re.S)
_TRAILER = re.compile(r"(?:\s|--[ \t][^\n]*)*")


class BadAccounts(Exception):
    pass


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def quote_string(text: str) -> str:
    if "\\" in text or "\0" in text:
        raise BadAccounts("a backslash or NUL in a name or hash")
    return "'" + text.replace("'", "''") + "'"


def account(user: str, host: str | None) -> str:
    """`user`@`host`, or `role` (a role has no host)."""
    return quote_ident(user) if host is None else f"{quote_ident(user)}@{quote_ident(host)}"


@dataclass
class Account:
    user: str
    host: str | None  # None: a role
    plugin: str = ""
    auth: str = ""
    locked: bool = False  # ACCOUNT LOCK: its login was not carried

    @property
    def name(self) -> str:
        return account(self.user, self.host)

    @property
    def can_log_in(self) -> bool:
        """A user with a plugin and a credential: anything else is created locked (a
        backup never makes an account that logs in without a password)."""
        return bool(self.plugin and self.auth and not self.locked)

    def create_sql(self, mysql: bool = False) -> str:
        if self.host is None:
            return f"CREATE ROLE IF NOT EXISTS {self.name};"
        if not self.can_log_in:
            return f"CREATE USER IF NOT EXISTS {self.name} ACCOUNT LOCK;"
        how = (f" IDENTIFIED WITH {quote_string(self.plugin)} AS {quote_string(self.auth)}"
               if mysql else
               f" IDENTIFIED VIA {self.plugin} USING {quote_string(self.auth)}")
        return f"CREATE USER IF NOT EXISTS {self.name}{how};"


def escape_db(name: str) -> str:
    """A database name as a database-level GRANT means it exactly: `_` and `%` are
    wildcards there."""
    return name.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")


@dataclass
class Grant:
    privileges: str  # as written (privilege words and column lists), checked
    kind: str  # "" | "TABLE" | "PROCEDURE" | "FUNCTION"
    obj: str | None  # None: the whole database
    grantee: str
    grant_option: bool

    def sql(self, database: str) -> str:
        on = (f"{self.kind + ' ' if self.kind else ''}{quote_ident(database)}."
              + quote_ident(self.obj)) if self.obj is not None else \
            f"{quote_ident(escape_db(database))}.*"
        return (f"GRANT {self.privileges} ON {on} TO {self.grantee}"
                + (" WITH GRANT OPTION" if self.grant_option else "") + ";")


@dataclass
class RoleGrant:
    role: str
    to: str
    admin: bool

    def sql(self) -> str:
        return f"GRANT {self.role} TO {self.to}{' WITH ADMIN OPTION' if self.admin else ''};"


@dataclass
class DefaultRole:
    role: str
    to: str

    def sql(self, mysql: bool = False) -> str:
        return f"SET DEFAULT ROLE {self.role} {'TO' if mysql else 'FOR'} {self.to};"


@dataclass
class Accounts:
    accounts: dict[str, Account] = field(default_factory=dict)  # name -> account
    grants: list[Grant] = field(default_factory=list)
    role_grants: list[RoleGrant] = field(default_factory=list)
    default_roles: list[DefaultRole] = field(default_factory=list)


def _normalize(kind: str, value: str) -> tuple[str, str]:
    if kind == "ident":
        return kind, value.replace("``", "`")
    if kind == "string":
        return kind, value.replace("''", "'")
    if kind == "word":
        return kind, value.upper()
    return kind, value


class _Reader:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.t, self.i = tokens, 0

    def peek(self, n: int = 0) -> tuple[str, str]:
        return self.t[self.i + n] if self.i + n < len(self.t) else ("", "")

    def word(self, *words: str) -> bool:
        if all(self.peek(k) == ("word", w) for k, w in enumerate(words)):
            self.i += len(words)
            return True
        return False

    def expect(self, *words: str) -> None:
        if not self.word(*words):
            raise BadAccounts(f"{' '.join(words)} expected")

    def name(self) -> str:
        kind, value = self.peek()
        if kind not in ("ident", "string") or not value or "\0" in value:
            raise BadAccounts("a name expected")
        self.i += 1
        return value

    def punct(self, p: str) -> bool:
        if self.peek() == ("punct", p):
            self.i += 1
            return True
        return False

    def account(self) -> str:
        user = self.name()
        if self.punct("@"):
            return account(user, self.name())
        if user.upper() == "PUBLIC":  # MariaDB 10.11: every account on the server
            raise BadAccounts("a grant to or of PUBLIC")
        return account(user, None)

    def end(self) -> bool:
        return self.i >= len(self.t)


def _statements(lines: list[bytes]) -> Iterable[list[tuple[str, str]]]:
    return statements(lines, _TOKEN, _TRAILER, _normalize, BadAccounts)


def parse(lines: list[bytes], database: str, first_line: int = 1) -> Accounts:
    """The head's statements; anything but what Safehold writes there is refused
    (UnsafeScript naming the head's first line), as is a grant on another database."""
    try:
        return _parse(lines, database)
    except BadAccounts as exc:
        raise UnsafeScript(first_line, f"the backup's accounts hold {exc}; only the "
                           "statements Safehold writes there are accepted",
                           code="unsafe_backup") from None


def _parse(lines: list[bytes], database: str) -> Accounts:
    a = Accounts()
    for st in _statements(lines):
        found = _statement(_Reader(st), database)
        if isinstance(found, Account):
            if len(a.accounts) >= MAX_ACCOUNTS:
                raise BadAccounts(f"more than {MAX_ACCOUNTS} accounts")
            a.accounts.setdefault(found.name, found)
        elif isinstance(found, Grant):
            a.grants.append(found)
        elif isinstance(found, RoleGrant):
            a.role_grants.append(found)
        else:
            a.default_roles.append(found)
    named = [g.grantee for g in a.grants] + [x for rg in a.role_grants
                                              for x in (rg.role, rg.to)] \
        + [x for dr in a.default_roles for x in (dr.role, dr.to)]
    for name in named:
        if name not in a.accounts:
            raise BadAccounts(f"a grant to or of {name}, which it never creates")
    return a


def parse_one(line: str, database: str) -> Account | Grant | RoleGrant | DefaultRole:
    """One statement (a `SHOW GRANTS` line, say); BadAccounts if it is not one the head
    may hold."""
    statements = list(_statements([line.rstrip(";").encode() + b";"]))
    if len(statements) != 1:
        raise BadAccounts("one statement expected")
    return _statement(_Reader(statements[0]), database)


def _statement(r: _Reader, database: str) -> Account | Grant | RoleGrant | DefaultRole:
    found: Account | Grant | RoleGrant | DefaultRole
    if r.word("CREATE", "ROLE", "IF", "NOT", "EXISTS"):
        found = Account(r.name(), None)
        if found.user.upper() == "PUBLIC":
            raise BadAccounts("the PUBLIC role")
    elif r.word("CREATE", "USER", "IF", "NOT", "EXISTS"):
        found = _user(r)
    elif r.word("GRANT"):
        found = _grant(r, database)
    elif r.word("SET", "DEFAULT", "ROLE"):
        role = r.account()
        r.expect("FOR")
        found = DefaultRole(role, r.account())
    else:
        raise BadAccounts(f"a statement it does not accept "
                          f"({' '.join(v for _, v in r.t[:4])!r})")
    if not r.end():
        raise BadAccounts(f"more than it accepts in {' '.join(v for _, v in r.t[:4])!r}")
    return found


def _user(r: _Reader) -> Account:
    user = r.name()
    if not r.punct("@"):
        raise BadAccounts("a user without its host")
    acc = Account(user, r.name())
    if r.word("IDENTIFIED", "VIA"):
        acc.plugin = r.peek()[1].lower() if r.peek()[0] == "word" else ""
        r.i += 1
        if r.word("USING"):
            acc.auth = _string(r)
    elif r.word("IDENTIFIED", "WITH"):
        acc.plugin = _string(r)
        if r.word("AS"):
            acc.auth = _string(r)
    if acc.plugin and acc.plugin not in PLUGINS:
        raise BadAccounts(f"an authentication plugin it does not accept ({acc.plugin[:40]!r})")
    acc.locked = r.word("ACCOUNT", "LOCK")
    if acc.name.lower() == "`public`":
        raise BadAccounts("the PUBLIC role")
    return acc


def _string(r: _Reader) -> str:
    kind, value = r.peek()
    if kind != "string":
        raise BadAccounts("a quoted string expected")
    r.i += 1
    return value


def _grant(r: _Reader, database: str) -> Grant | RoleGrant:
    # a role grant: GRANT `role`[@`host`] TO account [WITH ADMIN OPTION]
    if r.peek()[0] in ("ident", "string") and (
            r.peek(1) == ("word", "TO") or r.peek(1) == ("punct", "@")
            and r.peek(3) == ("word", "TO")):
        role = r.account()
        r.expect("TO")
        to = r.account()
        return RoleGrant(role, to, r.word("WITH", "ADMIN", "OPTION"))
    privileges: list[str] = []
    while True:
        priv = next((p for p in _MULTIWORD if r.word(*p.split())), None)
        if priv is None:
            kind, value = r.peek()
            if kind != "word" or value not in PRIVILEGES:
                raise BadAccounts(f"a privilege it does not accept ({value[:40]!r})")
            priv = value
            r.i += 1
        if r.punct("("):
            columns = [r.name()]
            while r.punct(","):
                columns.append(r.name())
            if not r.punct(")"):
                raise BadAccounts("a column list without its ')'")
            priv += " (" + ", ".join(quote_ident(c) for c in columns) + ")"
        privileges.append(priv)
        if not r.punct(","):
            break
    r.expect("ON")
    kind = next((k for k in ("TABLE", "PROCEDURE", "FUNCTION") if r.word(k)), "")
    on = r.name()
    # database-level: `_`/`%` are wildcards, so the exact name is escaped (`my\_app`)
    if on != database and (kind or on != escape_db(database)):
        raise BadAccounts("a grant on another database than the backup's")
    if not r.punct("."):
        raise BadAccounts("a grant on a database without '.'")
    obj = None if r.punct("*") else r.name()
    if obj is not None and on != database:
        raise BadAccounts("a grant on another database than the backup's")
    r.expect("TO")
    grantee = r.account()
    return Grant(", ".join(privileges), kind, obj, grantee, r.word("WITH", "GRANT", "OPTION"))


@dataclass
class Plan:
    sql: str = ""
    created: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def missing(a: Accounts, existing: set[str]) -> list[str]:
    return sorted(n for n in a.accounts if n not in existing)


def plan(a: Accounts, existing: set[str], *, database: str, choice: str | None,
         mysql: bool) -> Plan:
    """The SQL to run after the data: accounts the server lacks (choice "create"), then
    the backup's grants on this database; nothing with choice "skip"."""
    p = Plan()
    if choice == "skip":
        if a.accounts:
            p.warnings.append(f"roles = \"skip\": {len(a.grants)} grant(s) of "
                              f"{len(a.accounts)} account(s) left out: "
                              + ", ".join(sorted(a.accounts)[:50]))
        return p
    out: list[str] = []
    if choice == "create":
        p.created = missing(a, existing)
        out += [a.accounts[n].create_sql(mysql) for n in p.created]
        if locked := [n for n in p.created
                      if a.accounts[n].host is not None and not a.accounts[n].can_log_in]:
            p.warnings.append("created LOCKED, their login was not in the backup (another "
                              "plugin, or no password): " + ", ".join(locked[:50])
                              + " — ALTER USER … IDENTIFIED BY …, then ACCOUNT UNLOCK")
    alive = existing | set(p.created)
    out += [g.sql(database) for g in a.grants if g.grantee in alive]
    skipped = []
    for rg in a.role_grants:
        if rg.role in p.created and rg.to in alive:
            out.append(rg.sql())
        elif rg.role not in existing or rg.to not in existing:
            skipped.append(f"{rg.role} to {rg.to}")
    for dr in a.default_roles:
        if dr.to in p.created and dr.role in alive:
            out.append(dr.sql(mysql))
    if skipped:
        p.warnings.append("role grants not given (the role existed before this restore): "
                          + "; ".join(skipped[:50]))
    p.sql = "\n".join(out)
    return p
