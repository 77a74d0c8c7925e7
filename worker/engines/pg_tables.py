"""PostgreSQL restores of some tables only (issue 25's `tables`), inside the one transaction
Safehold opens and commits itself.

A table the live database has keeps its definition; its rows are replaced: every foreign key
that touches it is dropped (and put back exactly, validated, before COMMIT: a row the backup
lacks but another table still points at fails the restore, which then changes nothing), its
own triggers are switched off for the load (so an audit trigger does not log a restore)
and back to what they were, it is emptied with `TRUNCATE ONLY` (never `CASCADE`), loaded
from its COPY block, and the sequences it owns are set to the backup's values. A table the
live database lacks is made as it was dumped (see `shared.formats.pgtables`). Before COMMIT
the transaction proves two things on the server: each table holds exactly the rows the
backup recorded, and no other table had a row inserted, updated or deleted
(`pg_stat_xact_all_tables`)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.config import TargetConfig
from shared.errors import RestoreFailed
from shared.formats.pgscript import quote_ident as dumped_ident
from shared.formats.pgtables import Rel, Selection, parse_table_name
from worker.engines.pg_connection import SYSTEM_SCHEMAS, connect, quote_ident, quote_literal

_ENABLE = {"O": "ENABLE TRIGGER", "A": "ENABLE ALWAYS TRIGGER", "R": "ENABLE REPLICA TRIGGER"}


def rels(tables: Sequence[str]) -> list[Rel]:
    out = []
    for name in tables:
        rel = parse_table_name(name)
        if rel is None:
            raise RestoreFailed(f"{name!r} is not a schema.table name", code="invalid_body",
                                database_unchanged=True)
        out.append(rel)
    return out


def qualified(rel: Rel) -> str:
    return f"{quote_ident(rel[0])}.{quote_ident(rel[1])}"


async def present(target: TargetConfig, tables: Sequence[str]) -> list[str]:
    """The named tables the live database has (what a safety backup can hold)."""
    async with connect(target) as conn:
        return [t for t, rel in zip(tables, rels(tables), strict=True) if await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'r'", *rel)]


def dump_flags(tables: Sequence[str]) -> list[str]:
    """pg_dump's `--table` for exactly these tables (quoted: no pattern characters)."""
    return [f"--table={qualified(rel)}" for rel in rels(tables)]


@dataclass
class TablePlan:
    selection: Selection
    prelude: str  # after BEGIN, before the backup's sections
    postlude: str  # after them, before the end marker and COMMIT

    def describe(self) -> str:
        s = self.selection
        parts = []
        if s.data:
            parts.append("rows replaced in " + ", ".join(f"{a}.{b}" for a, b in sorted(s.data)))
        if s.create:
            parts.append("made as dumped: " + ", ".join(f"{a}.{b}" for a, b in
                                                        sorted(s.create)))
        return "; ".join(parts)


async def plan(target: TargetConfig, tables: Sequence[str],
               manifest: Mapping[str, object]) -> TablePlan:
    """What the restore of `tables` does to the live database, read from its catalog."""
    wanted = rels(tables)
    data: dict[Rel, int] = {}
    async with connect(target) as conn:
        # every name the catalog gives back schema-qualified (the backup's own settings,
        # search_path included, never decide what the put-back statements reach)
        await conn.execute("SET search_path = ''")
        for rel in wanted:
            row = await conn.fetchrow(
                "SELECT c.oid, c.relkind::text FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2", *rel)
            if row is None:
                continue
            if row["relkind"] != "r":
                raise RestoreFailed(
                    f"{rel[0]}.{rel[1]} is not an ordinary table in the live database "
                    f"(relkind {row['relkind']}): restore its partitions by name, or the "
                    "whole database", database_unchanged=True, code="table_refused")
            data[rel] = row["oid"]
        oids = list(data.values())
        sequences = {(r["nspname"], r["relname"]) for r in await conn.fetch(
            "SELECT n.nspname, s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid "
            "JOIN pg_namespace n ON n.oid = s.relnamespace WHERE d.classid = "
            "'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND s.relkind = 'S'"
            " AND d.deptype IN ('a', 'i') AND d.refobjid = ANY($1::oid[])", oids)}
        fks = await conn.fetch(
            "SELECT format('%I.%I', n.nspname, c.relname) AS tbl, quote_ident(k.conname) AS "
            "con, pg_get_constraintdef(k.oid) AS def FROM pg_constraint k "
            "JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE k.contype = 'f' AND (k.conrelid = ANY($1::oid[]) "
            "OR k.confrelid = ANY($1::oid[])) AND k.conparentid = 0 ORDER BY 1, 2", oids)
        triggers = await conn.fetch(
            "SELECT format('%I.%I', n.nspname, c.relname) AS tbl, quote_ident(tgname) AS trg, "
            "tgenabled::text AS state FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT tgisinternal "
            "AND tgrelid = ANY($1::oid[]) ORDER BY 1, 2", oids)
        creating = [rel for rel in wanted if rel not in data]
        live_tables: set[Rel] = set()
        live_fks: set[tuple[str, str, str]] = set()
        if creating:
            live_tables = {(r[0], r[1]) for r in await conn.fetch(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                f"ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname "
                f"NOT IN {SYSTEM_SCHEMAS}")}
            live_fks = {(r[0], r[1], r[2]) for r in await conn.fetch(
                "SELECT n.nspname, c.relname, k.conname FROM pg_constraint k JOIN pg_class c "
                "ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE k.contype = 'f'")}
    pre = ["SET LOCAL search_path = '';"]
    if data:
        names = ", ".join(qualified(r) for r in data)
        pre.append(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE;")
        pre += [f"ALTER TABLE {f['tbl']} DROP CONSTRAINT {f['con']};" for f in fks]
        pre += [f"ALTER TABLE {qualified(r)} DISABLE TRIGGER USER;" for r in data]
        pre.append(f"TRUNCATE ONLY {names};")
    post = ["SET LOCAL search_path = '';"]
    post += [f"ALTER TABLE {f['tbl']} ADD CONSTRAINT {f['con']} {f['def']};" for f in fks]
    post += [f"ALTER TABLE {t['tbl']} {_ENABLE[t['state']]} {t['trg']};"
             for t in triggers if t["state"] in _ENABLE]
    post.append(_proof(wanted, manifest))
    return TablePlan(Selection(data=set(data), create=set(creating), sequences=sequences,
                               live_tables=live_tables, live_fks=live_fks),
                     " ".join(pre), "\n".join(post))


def _proof(wanted: list[Rel], manifest: Mapping[str, object]) -> str:
    """A DO block that fails the transaction unless every table holds the rows the backup
    recorded for it and nothing else had a row written."""
    counts = manifest.get("exact_counts")
    counts = counts if isinstance(counts, dict) else {}
    checks = []
    for rel in wanted:
        expect = counts.get(f"{dumped_ident(rel[0]).decode()}.{dumped_ident(rel[1]).decode()}",
                            counts.get(f"{rel[0]}.{rel[1]}"))
        if isinstance(expect, int) and not isinstance(expect, bool):
            shown = quote_literal(f"{rel[0]}.{rel[1]}")
            checks.append(
                f"n := (SELECT count(*) FROM ONLY {qualified(rel)}); IF n <> {expect} THEN "
                f"RAISE EXCEPTION 'safehold: % holds % rows after the load; the backup "
                f"recorded {expect}', {shown}, n; END IF;")
    regs = ", ".join(f"{quote_literal(qualified(r))}::regclass" for r in wanted)
    tag = f"$sh_{secrets.token_hex(8)}$"  # no name can end the block early
    return (
        f"DO {tag} DECLARE n bigint; other text; BEGIN " + " ".join(checks) +
        " SELECT string_agg(format('%I.%I', schemaname, relname), ', ') INTO other FROM "
        "pg_catalog.pg_stat_xact_all_tables WHERE schemaname NOT IN ('pg_catalog', "
        f"'pg_toast', 'information_schema') AND relid <> ALL (ARRAY[{regs}]) AND "
        "n_tup_ins + n_tup_upd + n_tup_del > 0; IF other IS NOT NULL THEN RAISE EXCEPTION "
        "'safehold: the load wrote rows of tables it was not asked to restore: %', other; "
        f"END IF; END {tag};")
