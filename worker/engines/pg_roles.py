"""Roles in a PostgreSQL restore: the roles a database's dump names, the ones the server
lacks (refused before anything changes unless the restore chose create, map or skip), the
SQL creating them from the backup's globals, a schema's grants re-created."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.config import TargetConfig
from shared.errors import (
    RestoreFailed,
)
from worker.engines import RestoreOptions, pg_globals
from worker.engines.pg_connection import conn_params, connect, quote_ident

USER_SCHEMAS = ("NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
                 "AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%'")
# every role the database's dump names: owners, grantees (column grants and default
# privileges too), policy roles (grantee 0 is PUBLIC: no role)
ROLES_REFERENCED = f"""
WITH refs(r) AS (
  SELECT n.nspowner FROM pg_namespace n WHERE n.nspname {USER_SCHEMAS}
  UNION SELECT (aclexplode(n.nspacl)).grantee FROM pg_namespace n
    WHERE n.nspacl IS NOT NULL AND n.nspname {USER_SCHEMAS}
  UNION SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname {USER_SCHEMAS}
  UNION SELECT (aclexplode(c.relacl)).grantee FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relacl IS NOT NULL AND n.nspname {USER_SCHEMAS}
  UNION SELECT (aclexplode(a.attacl)).grantee FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.attacl IS NOT NULL AND n.nspname {USER_SCHEMAS}
  UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname {USER_SCHEMAS}
  UNION SELECT (aclexplode(p.proacl)).grantee FROM pg_proc p
    JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.proacl IS NOT NULL AND n.nspname {USER_SCHEMAS}
  UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname {USER_SCHEMAS}
  UNION SELECT (aclexplode(t.typacl)).grantee FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE t.typacl IS NOT NULL AND n.nspname {USER_SCHEMAS}
  UNION SELECT unnest(polroles) FROM pg_policy
  UNION SELECT defaclrole FROM pg_default_acl
  UNION SELECT (aclexplode(defaclacl)).grantee FROM pg_default_acl
  UNION SELECT evtowner FROM pg_event_trigger
  UNION SELECT pubowner FROM pg_publication
  UNION SELECT lomowner FROM pg_largeobject_metadata
  UNION SELECT (aclexplode(lomacl)).grantee FROM pg_largeobject_metadata
    WHERE lomacl IS NOT NULL
  UNION SELECT srvowner FROM pg_foreign_server
  UNION SELECT fdwowner FROM pg_foreign_data_wrapper
  UNION SELECT umuser FROM pg_user_mappings
)
SELECT rolname FROM pg_roles WHERE oid IN (SELECT r FROM refs) ORDER BY 1"""


_SCHEMA_PRIVS = {"U": "USAGE", "C": "CREATE"}


def grants(schema: str, acl: list[str], owner: str) -> list[str]:
    """GRANT statements re-creating a schema's ACL items (`grantee=UC/grantor`)."""
    out = []
    for item in acl:
        grantee, _, rest = item.partition("=")
        privs = rest.split("/", 1)[0]
        grantee = grantee.strip('"')
        if grantee == owner:
            continue  # the owner's privileges are implicit
        names = [_SCHEMA_PRIVS[c] for c in privs if c in _SCHEMA_PRIVS]
        if names:
            who = "PUBLIC" if grantee == "" else quote_ident(grantee)
            out.append(f"GRANT {', '.join(names)} ON SCHEMA {quote_ident(schema)} TO {who};")
    return out


@dataclass
class RoleFacts:
    """What a restore learnt about roles before it changed anything."""

    with_globals: bool = False  # the manifest says the backup carries the server's globals
    wanted: list[str] = field(default_factory=list)  # the roles the backup names
    missing: list[str] = field(default_factory=list)  # … that the server lacks
    superuser: bool = False  # the restoring role


async def missing_roles(target: TargetConfig, manifest: Mapping[str, object],
                         options: RestoreOptions) -> RoleFacts:
    """The roles the backup names that the server lacks; refuses the restore before
    anything changes when there are some and no choice was made (or the map does not
    cover them). The list comes from the manifest (untrusted: names only; a role it
    left out fails the load, which rolls back)."""
    named = manifest.get("roles")
    facts = RoleFacts(with_globals=isinstance(manifest.get("globals"), dict))
    if options.roles == "skip" or not isinstance(named, list):
        return facts
    facts.wanted = sorted({r for r in named if isinstance(r, str) and 0 < len(r) <= 63
                           and "\0" not in r})[:10_000]
    mapping = dict(options.owner_map) if options.roles == "map" else {}
    async with connect(target) as conn:  # the backup's roles and the map's
        have = {r[0] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])",
            sorted({*facts.wanted, *mapping.values()}))}
        facts.superuser = bool(await conn.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
    facts.missing = [r for r in facts.wanted if r not in have]
    if options.roles == "map":
        absent = sorted(set(mapping.values()) - have)
        unmapped = [r for r in facts.missing if r not in mapping]
        if absent or unmapped:
            raise RestoreFailed(
                "owner_map does not cover this server: "
                + (f"roles it maps to do not exist: {', '.join(absent)}; " if absent
                   else "")
                + (f"roles the backup names that the server lacks and the map leaves "
                   f"out: {', '.join(unmapped[:50])}" if unmapped else "")
                + ". Nothing was changed", database_unchanged=True, code="roles_missing")
        return facts
    if not facts.missing or options.roles == "create":
        return facts
    raise RestoreFailed(
        f"the backup's owners and grants name roles this server does not have: "
        f"{', '.join(facts.missing[:50])}{' …' if len(facts.missing) > 50 else ''}. "
        "Nothing was changed. Choose: \"roles\": \"create\" (as the backup's globals "
        "describe them, else NOLOGIN without passwords), \"roles\": \"map\" with "
        "\"owner_map\": {\"old\": \"new\"}, or \"roles\": \"skip\" (owners and grants "
        "left out, listed in the result)",
        database_unchanged=True, code="roles_missing")


async def roles_plan(target: TargetConfig, facts: RoleFacts,
                      head: pg_globals.GlobalsHead) -> pg_globals.Plan:
    """roles = "create": the SQL creating what the database needs that the server
    lacks — from the backup's globals when its head has them (attributes, passwords,
    memberships, settings), else the missing roles NOLOGIN."""
    database = conn_params(target)["database"]
    if not head.lines:
        return pg_globals.plan(pg_globals.Globals(), facts.missing, set(),
                               database=database, superuser=facts.superuser)
    found = pg_globals.parse(head.lines, head.first_line)
    names = sorted({*found.roles, *facts.wanted})
    async with connect(target) as conn:
        existing = {r[0] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])", names)}
        contexts = {r[0]: r[1] for r in await conn.fetch(
            "SELECT name, context FROM pg_settings")}

    def settable(name: str) -> bool:  # by any user (an extension not loaded now
        return contexts.get(name) == "user"  # may make its setting superuser-only)
    return pg_globals.plan(found, facts.wanted, existing, database=database,
                           superuser=facts.superuser, settable=settable)
