"""What every part of Safehold knows of an engine, in one table: its name, the plain
extension of its dumps, the formats a client may ask for, the stock tool that restores a
dump by hand, and where a restore drill puts its scratch copy. The API (names, uploads,
the OpenAPI enum) and the worker (each engine module) read it from here; the engines'
code lives in worker/engines/, their content checks in shared/formats/."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineFacts:
    name: str
    extension: str  # the plain (uncompressed) dump's file extension
    formats: tuple[str, ...] = ()  # formats a client may ask for, the default first
    by_hand: str = ""  # the stock tool that restores a plain dump without Safehold
    scratch: str | None = None  # a drill's scratch place (None: content check only)


ENGINES: dict[str, EngineFacts] = {f.name: f for f in (
    EngineFacts("postgresql", "sql", by_hand="psql -X -v ON_ERROR_STOP=1 -d <db> -f <file>",
                scratch="a safehold_drill_… database on the same server"),
    EngineFacts("mysql", "sql", by_hand="mariadb --binary-mode <db> < <file>",
                scratch="a safehold_drill_… database on the same server"),
    EngineFacts("sqlite", "db", by_hand="cat <file> > app.db (it is the database file)",
                scratch="a file in the worker's private temp space"),
    EngineFacts("mongodb", "tar", by_hand="tar xf <file> -C dump && mongorestore --drop dump",
                scratch="safehold_drill_…_<db> databases on the same server"),
    EngineFacts("redis", "resp", formats=("resp", "rdb"),
                by_hand="redis-cli --pipe < <file>",
                scratch="a throwaway redis-server on a free loopback port"),
    EngineFacts("neo4j", "cypher",
                by_hand="cypher-shell -u neo4j -d neo4j -f <file> (on an empty database)"),
)}


def extensions() -> tuple[str, ...]:
    """Every extension a backup's name may have, formats included."""
    return tuple(sorted({f.extension for f in ENGINES.values()}
                        | {x for f in ENGINES.values() for x in f.formats}))
