"""Where a restore goes (issue 25), checked by the API before any job exists: a new
database beside the live one (`into_database`, PostgreSQL and MySQL/MariaDB). A hostile or
unlucky name is refused here — quotes, dots, `..`, NUL, any length past the server's, the
target's own database, a system one, a drill's scratch copy, or the database another
configured target backs up on the same server (a restore there would overwrite that
target's data behind its lock and audit). The worker checks again on the server."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.config import Settings, TargetConfig
from shared.errors import BadRequest, Unprocessable
from shared.jobs import JobParams

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,100}(\.[A-Za-z0-9]{1,16})?\Z")
BESIDE = ("postgresql", "mysql", "sqlite")
SYSTEM = {"postgresql": {"postgres", "template0", "template1"},
          "mysql": {"mysql", "sys", "information_schema", "performance_schema"}}
LOOPBACK = {"localhost", "127.0.0.1", "::1", ""}


def _where(target: TargetConfig) -> tuple[str, int | None, str]:
    """(host, port, database) of a one-database target's URL, the host normalised."""
    u = urlsplit(target.url)
    host = (u.hostname or "").lower()
    return ("loopback" if host in LOOPBACK else host), u.port, unquote(u.path.lstrip("/"))


def scope_params(settings: Settings, target: TargetConfig, into_database: object,
                 replace: object) -> JobParams:
    """The job parameters of a restore's scope (empty: over the live database)."""
    if into_database is None:
        if replace:
            raise BadRequest("\"replace\" goes with \"into_database\"", code="invalid_body")
        return {}
    if target.engine not in BESIDE or target.databases:
        kind = "a server target" if target.databases else target.engine
        raise Unprocessable("into_database restores beside the live database on PostgreSQL, "
                            f"MySQL/MariaDB and SQLite targets, not on {kind}",
                            code="invalid_body")
    if target.engine == "sqlite":
        return _beside_file(settings, target, into_database, replace)
    if not isinstance(into_database, str) or not NAME.match(into_database):
        raise BadRequest("into_database is a plain database name: letters, digits and _, "
                         "1-63 characters, not starting with a digit", code="invalid_body")
    def fold(n: str) -> str:
        return n.lower() if target.engine == "mysql" else n
    name = fold(into_database)
    host, port, live = _where(target)
    if name == fold(live):
        raise Unprocessable(f"{into_database} is target '{target.id}''s own database: a "
                            "restore without into_database replaces it", code="database_refused")
    if name in SYSTEM[target.engine] or name.startswith("safehold_drill_"):
        raise Unprocessable(f"{into_database} is a system database or a drill's scratch "
                            "copy", code="database_refused")
    for other in settings.targets.values():
        if other.id == target.id or other.engine != target.engine:
            continue
        o_host, o_port, o_db = _where(other)
        if (o_host, o_port) == (host, port) and (
                name == fold(o_db) or name in {fold(d) for d in other.databases}):
            raise Unprocessable(f"database {into_database} is what target '{other.id}' backs "
                                "up: restoring into it would overwrite that target's data",
                                code="database_refused")
    params: JobParams = {"into_database": into_database}
    if replace:
        params["replace"] = True
    return params


def _beside_file(settings: Settings, target: TargetConfig, into: object, replace: object
                 ) -> JobParams:
    """SQLite: a new file in the target's directory (a plain file name, never a path)."""
    if not isinstance(into, str) or not FILE.match(into):
        raise BadRequest("into_database is a file name beside the target's database file: "
                         "letters, digits, _ and -, an optional .extension, no path",
                         code="invalid_body")
    directory = Path(target.path).resolve().parent
    wanted = directory / into
    for other in settings.targets.values():
        if other.engine == "sqlite" and Path(other.path).resolve() == wanted:
            raise Unprocessable(f"{into} is the database file of target '{other.id}'"
                                + (": a restore without into_database replaces it"
                                   if other.id == target.id else ""),
                                code="database_refused")
    params: JobParams = {"into_database": into}
    if replace:
        params["replace"] = True
    return params
