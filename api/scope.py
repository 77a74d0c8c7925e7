"""Where a restore goes (issue 25), checked by the API before any job exists: a new
database beside the live one (`into_database`: PostgreSQL, MySQL/MariaDB, MongoDB, a
Redis database index, a SQLite file). A hostile or
unlucky name is refused here — quotes, dots, `..`, NUL, any length past the server's, the
target's own database, a system one, a drill's scratch copy, or the database another
configured target backs up on the same server (a restore there would overwrite that
target's data behind its lock and audit). The worker checks again on the server."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.config import Settings, TargetConfig
from shared.errors import BadRequest, Unprocessable
from shared.formats.pgtables import parse_table_name
from shared.jobs import JobParams

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,100}(\.[A-Za-z0-9]{1,16})?\Z")
BESIDE = ("postgresql", "mysql", "sqlite", "mongodb", "redis")
DB_INDEX = re.compile(r"(0|[1-9][0-9]{0,4})\Z")  # Redis: another database index
SYSTEM = {"postgresql": {"postgres", "template0", "template1"},
          "mysql": {"mysql", "sys", "information_schema", "performance_schema"},
          "mongodb": {"admin", "local", "config"}}
LOOPBACK = {"localhost", "127.0.0.1", "::1", ""}
TABLES = ("postgresql", "sqlite", "mysql", "mongodb")
ANY_FORM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_][A-Za-z0-9_.-]{0,119})?\Z")
# MongoDB: db.collection (a database name has no dot; a collection's may)
MONGO = re.compile(r"[A-Za-z0-9_-]{1,63}\.(?!system\.)[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}\Z")
# a table of one database: plain letters, digits and _ (never SQLite's own sqlite_ tables)
PLAIN = re.compile(r"(?!sqlite_)[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
MAX_TABLES = 100
MAX_SCHEMA_TABLES = 2000  # the tables `schemas` may expand to
SCHEMA = re.compile(r"(?!pg_)[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


def _where(target: TargetConfig) -> tuple[str, int | None, str]:
    """(host, port, database) of a one-database target's URL, the host normalised."""
    u = urlsplit(target.url)
    host = (u.hostname or "").lower()
    return ("loopback" if host in LOOPBACK else host), u.port, unquote(u.path.lstrip("/"))


def scope_params(settings: Settings, target: TargetConfig, into_database: object,
                 replace: object, tables: object = None, dest: TargetConfig | None = None,
                 keys: object = None, schemas: object = None) -> JobParams:
    """The job parameters of a restore's scope (empty: over the live database); `dest`:
    the target it goes into (into_target), if not `target`. `schemas` become tables once
    the backup's manifest is at hand (check_tables)."""
    params: JobParams = {**_tables(target, tables), **keys_params(target, keys),
                         **_schemas(target, schemas)}
    return {**params, **_into(settings, target, into_database, replace),
            **_clone(target, dest or target, into_database)}


def _clone(source: TargetConfig, dest: TargetConfig, into_database: object
                 ) -> JobParams:
    """`into_target`: a backup of `source` restored into another configured target of the
    same engine (prod -> staging), with that target's credentials, lock, safety backup and
    audit (the caller holds operator on both: checked by the caller of this)."""
    if dest.id == source.id:
        return {}
    if dest.engine != source.engine:
        raise Unprocessable(f"target '{dest.id}' is {dest.engine}; a {source.engine} backup "
                            "goes into a target of its own engine", code="engine_mismatch")
    if source.is_set or dest.is_set or into_database is not None:
        raise Unprocessable("into_target restores a one-database target's backup into "
                            "another one-database target (not a server target, not with "
                            "into_database)", code="invalid_body")
    return {"from_target": source.id}


def scope_words(what: str, scope: JobParams, dest: str = "") -> str:
    """The audit's words for a restore: what, and where it goes."""
    if scope.get("from_target"):
        what += f" from target {scope['from_target']} into target {dest}"
    if into := scope.get("into_database"):
        what += f" into {into}"
    if schemas := scope.get("schemas"):
        what += " schemas " + ", ".join(schemas)
    if tables := scope.get("tables"):
        what += " tables " + ", ".join(tables)
    return what


def _schemas(target: TargetConfig, schemas: object) -> JobParams:
    """`schemas` (PostgreSQL): every table the backup holds in these schemas, restored as
    `tables` restores them (the schema's other objects are left as they are)."""
    if schemas is None:
        return {}
    if target.engine != "postgresql" or target.is_set:
        raise Unprocessable("\"schemas\" restores the tables of some schemas of a "
                            "PostgreSQL target", code="invalid_body")
    if not isinstance(schemas, list) or not 0 < len(schemas) <= MAX_TABLES or \
            len(set(map(str, schemas))) != len(schemas):
        raise BadRequest(f"\"schemas\" is a list of 1-{MAX_TABLES} different schema names",
                         code="invalid_body")
    for s in schemas:
        if not isinstance(s, str) or not SCHEMA.match(s) or s == "information_schema":
            plain = isinstance(s, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", s)
            raise (Unprocessable if plain else BadRequest)(
                f"{repr(s)[:80]} is not a schema of the application's (1-63 letters, digits "
                "or _, not a system schema; names that need quotes are restored with the "
                "whole database)", code="invalid_body")
    return {"schemas": list(schemas)}


def keys_params(target: TargetConfig, keys: object) -> JobParams:
    """`keys` (Redis): glob patterns of the keys to restore; every other key is left as
    it is."""
    if keys is None:
        return {}
    if target.engine != "redis" or target.is_set:
        raise Unprocessable("\"keys\" restores some keys of a Redis target",
                            code="invalid_body")
    if not isinstance(keys, list) or not 0 < len(keys) <= MAX_TABLES or not all(
            isinstance(k, str) and 0 < len(k) <= 512 and not set(k) & {"\0", "\r", "\n"}
            for k in keys):
        raise BadRequest(f"\"keys\" is a list of 1-{MAX_TABLES} glob patterns (1-512 "
                         "characters, no NUL or line breaks), e.g. [\"session:*\"]",
                         code="invalid_body")
    return {"keys": list(keys)}


def _tables(target: TargetConfig, tables: object) -> JobParams:
    """`tables`: some tables only, named `schema.table` (PostgreSQL) with plain identifiers
    (letters, digits, _ and $): never quotes, more dots, NUL or a path."""
    if tables is None:
        return {}
    if target.engine not in TABLES or target.is_set:
        kind = "a server target" if target.is_set else target.engine
        raise Unprocessable(f"\"tables\" restores some tables of a PostgreSQL, MySQL, "
                            "SQLite or MongoDB target, not "
                            f"of {kind} (not yet)", code="invalid_body")
    if not isinstance(tables, list) or not 0 < len(tables) <= MAX_TABLES or \
            len(set(map(str, tables))) != len(tables):
        raise BadRequest(f"\"tables\" is a list of 1-{MAX_TABLES} different table names",
                         code="invalid_body")
    pg = target.engine == "postgresql"
    plain = MONGO if target.engine == "mongodb" else PLAIN
    for t in tables:
        if not isinstance(t, str) or (parse_table_name(t) is None if pg
                                      else not plain.match(t)):
            shown = repr(t)[:80]
            # a name of another engine's form is no bad request, only not this target's
            error = Unprocessable if isinstance(t, str) and ANY_FORM.match(t) else BadRequest
            raise error(f"{shown} is not a table name of this target: "
                             + ("schema.table, each part" if pg else "")
                             + " 1-63 letters, digits or _, not starting with a digit "
                             "(names that need quotes are restored with the whole database)",
                             code="invalid_body")
    return {"tables": list(tables)}


def check_tables(params: JobParams, manifest: Mapping[str, object]) -> None:
    """Every table named is one the backup holds (its manifest's counts, as recorded);
    `schemas` are expanded into `params["tables"]` here: the tables the backup holds in
    them."""
    if params.get("schemas"):
        _expand_schemas(params, manifest)
    only = manifest.get("only_tables")
    if isinstance(only, list) and only and not params.get("tables"):
        raise Unprocessable(f"{manifest.get('filename')} holds only some tables ("
                            + ", ".join(map(str, only))[:300] + "): restore it with "
                            "\"tables\", never over the whole database",
                            code="partial_backup")
    held: set[str] = set()
    for key in ("counts", "exact_counts"):
        if isinstance(counts := manifest.get(key), dict):
            held |= {k.replace('"', "") for k in counts}
    if not held or not params.get("tables"):
        return
    if missing := [t for t in params["tables"] if t not in held]:
        raise Unprocessable(f"{manifest.get('filename')} holds no table "
                            + ", ".join(missing) + " (it holds: "
                            + ", ".join(sorted(held)[:30]) + (" …" if len(held) > 30 else "")
                            + ")", code="table_missing")


def _expand_schemas(params: JobParams, manifest: Mapping[str, object]) -> None:
    recorded: set[str] = set()
    for key in ("counts", "exact_counts"):
        if isinstance(counts := manifest.get(key), dict):
            recorded |= set(map(str, counts))
    if not recorded:
        raise Unprocessable(f"{manifest.get('filename')} records no tables: name them with "
                            "\"tables\"", code="table_missing")
    tables = set(params.get("tables") or [])
    for schema in params.get("schemas") or []:
        mine = sorted(t for t in recorded if t.split(".", 1)[0] == schema)
        if not mine:
            raise Unprocessable(f"{manifest.get('filename')} holds no table in schema "
                                f"{schema}", code="table_missing")
        if odd := [t for t in mine if parse_table_name(t) is None]:
            raise Unprocessable(f"schema {schema} holds tables whose names need quotes ("
                                + ", ".join(odd[:5])[:300] + "): restore the whole database, "
                                "or beside it, and copy them", code="invalid_body")
        tables |= set(mine)
    if len(tables) > MAX_SCHEMA_TABLES:
        raise Unprocessable(f"the schemas hold {len(tables)} tables (at most "
                            f"{MAX_SCHEMA_TABLES} in one restore): restore the whole "
                            "database, or beside it", code="invalid_body")
    params["tables"] = sorted(tables)


def _into(settings: Settings, target: TargetConfig, into_database: object,
          replace: object) -> JobParams:
    if into_database is None:
        if replace:
            raise BadRequest("\"replace\" goes with \"into_database\"", code="invalid_body")
        return {}
    if target.engine not in BESIDE or target.databases:
        kind = "a server target" if target.databases else target.engine
        raise Unprocessable("into_database restores beside the live database on PostgreSQL, "
                            f"MySQL/MariaDB, SQLite, MongoDB and Redis targets, not on {kind}",
                            code="invalid_body")
    if target.engine == "sqlite":
        return _beside_file(settings, target, into_database, replace)
    if target.engine == "redis":
        if not isinstance(into_database, str) or not DB_INDEX.match(into_database):
            raise BadRequest("into_database is another database index of the Redis server, "
                             "\"0\"-\"99999\"", code="invalid_body")
    elif not isinstance(into_database, str) or not NAME.match(into_database):
        raise BadRequest("into_database is a plain database name: letters, digits and _, "
                         "1-63 characters, not starting with a digit", code="invalid_body")
    def fold(n: str) -> str:
        return n.lower() if target.engine == "mysql" else n
    name = fold(into_database)
    host, port, live = _where(target)
    if name in {fold(d) for d in live.split(",")}:  # MongoDB: the databases it names
        raise Unprocessable(f"{into_database} is target '{target.id}''s own database: a "
                            "restore without into_database replaces it", code="database_refused")
    if name in SYSTEM.get(target.engine, ()) or name.startswith("safehold_drill_"):
        raise Unprocessable(f"{into_database} is a system database or a drill's scratch "
                            "copy", code="database_refused")
    for other in settings.targets.values():
        if other.id == target.id or other.engine != target.engine:
            continue
        o_host, o_port, o_db = _where(other)
        if (o_host, o_port) == (host, port) and (
                name in {fold(d) for d in o_db.split(",")} or
                name in {fold(d) for d in other.databases}):
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
