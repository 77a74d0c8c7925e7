"""Neo4j: the official async driver; backups are Cypher scripts `cypher-shell` can run.

Script layout (`backup_neo4j_<ts>.cypher[.gz]`), statements separated by `;`:
1. schema: constraints and indexes from `SHOW CONSTRAINTS` / `SHOW INDEXES` (Cypher 5),
   plus one temporary index per label on the import id `_safehold_id`;
2. nodes, grouped by label set, in batches:
   `UNWIND [{id: …, p: {…}}, …] AS row CREATE (n:A:B) SET n = row.p, n._safehold_id = row.id`;
3. relationships, grouped by type and end labels, matched on the import id;
4. cleanup: the import ids and their indexes are removed.
Property values are Cypher literals (temporal types via `datetime('…')` etc., points via
`point({…})`, lists). Cypher has no byte-array literal: byte arrays are written as integer
lists and the entity is tagged `_safehold_bytes`; Safehold's restore turns them back into
byte arrays (through driver parameters) before the cleanup — `cypher-shell` leaves them as
integer lists.

Reading streams both queries through the driver (records fetched 1000 at a time), so the
graph is never held in memory. `use_apoc=true` streams `apoc.export.cypher.all` instead.

Restore splits the script into statements (quotes, backticks and comments may contain
`;`), deletes every node in batches and drops the schema first (clean), then runs each
statement in its own transaction.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

from neo4j import AsyncDriver, AsyncGraphDatabase, AsyncManagedTransaction
from neo4j.exceptions import ClientError, DriverError, Neo4jError, ServiceUnavailable
from neo4j.spatial import CartesianPoint, Point, WGS84Point
from neo4j.time import Date, DateTime, Duration, Time

from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import BadRequest, DumpFailed, RestoreFailed
from shared.formats.cypher import FIX_BYTES_MARKER, StatementSplitter, check_statement
from shared.jobs import Phase
from shared.manifests import count_in
from worker.engines import (
    NO_OPTIONS,
    Dump,
    DumpOptions,
    RestoreOptions,
    dump_errors,
    restore_errors,
    unreachable,
)
from worker.progress import Progress

BATCH = 1000
IMPORT_ID = "_safehold_id"
BYTES_TAG = "_safehold_bytes"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def q(name: str) -> str:
    """A Cypher identifier, backtick-quoted when needed."""
    return name if _IDENT.match(name) else "`" + name.replace("`", "``") + "`"


def literal(value: object) -> str:
    """A property value as a Cypher literal."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "0.0/0.0"
        if math.isinf(value):
            return "1.0/0.0" if value > 0 else "-1.0/0.0"
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, bytes | bytearray):
        return "[" + ", ".join(str(b) for b in value) + "]"
    if isinstance(value, DateTime):
        fn = "datetime" if value.tzinfo is not None else "localdatetime"
        return f"{fn}('{value.isoformat()}')"
    if isinstance(value, Date):
        return f"date('{value.iso_format()}')"
    if isinstance(value, Time):
        fn = "time" if value.tzinfo is not None else "localtime"
        return f"{fn}('{value.iso_format()}')"
    if isinstance(value, Duration):
        return f"duration('{value.iso_format()}')"
    if isinstance(value, WGS84Point):
        coords = ["longitude", "latitude", "height"][: len(value)]
        return _point(coords, value)
    if isinstance(value, CartesianPoint | Point):
        coords = ["x", "y", "z"][: len(value)]
        return _point(coords, value)
    if isinstance(value, list | tuple):  # after Point and Duration, which are tuples too
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{q(k)}: {literal(v)}" for k, v in value.items()) + "}"
    raise DumpFailed(f"cannot write a property of type {type(value).__name__} as Cypher")


def _point(coords: list[str], value: Point) -> str:
    parts = [f"{c}: {literal(float(v))}" for c, v in zip(coords, value, strict=False)]
    return "point({" + ", ".join(parts) + f", srid: {value.srid}" + "})"


def _row(ids: dict[str, str], props: Mapping[str, object]) -> str:
    """One UNWIND row: the import id(s), the properties, and which of them are bytes."""
    byte_props = [k for k, v in props.items() if isinstance(v, bytes | bytearray)]
    extra = f", b: {literal(byte_props)}" if byte_props else ""
    head = ", ".join(f"{k}: {literal(v)}" for k, v in ids.items())
    return f"{{{head}, p: {literal(props)}{extra}}}"


def _labels(labels: list[str]) -> str:
    return "".join(f":{q(label)}" for label in sorted(labels))


class Neo4j:
    name: ClassVar[str] = "neo4j"
    extension: ClassVar[str] = ENGINES["neo4j"].extension
    atomic_restore: ClassVar[bool] = False

    def _conn(self, target: TargetConfig) -> tuple[str, str, str | None]:
        u = urlsplit(target.url)
        netloc = u.hostname or "127.0.0.1"
        if u.port:
            netloc += f":{u.port}"
        database = unquote(u.path.strip("/")) or None
        return (urlunsplit((u.scheme, netloc, "", u.query, "")),
                unquote(u.username or "neo4j"), database)

    @asynccontextmanager
    async def _driver(self, target: TargetConfig) -> AsyncIterator[tuple[AsyncDriver, str | None]]:
        url, user, database = self._conn(target)
        driver = AsyncGraphDatabase.driver(
            url, auth=(user, target.password.reveal() if target.password else ""))
        try:
            await driver.verify_connectivity()
        except (Neo4jError, ServiceUnavailable, OSError) as exc:
            await driver.close()
            raise unreachable(target, "Neo4j", exc, url) from None
        try:
            yield driver, database
        finally:
            await driver.close()

    async def _data(self, driver: AsyncDriver, database: str | None, query: str,
                    **params: Any) -> list[dict[str, Any]]:
        async with driver.session(database=database) as s:
            result = await s.run(query, **params)
            return await result.data()

    async def ping(self, target: TargetConfig) -> None:
        async with self._driver(target):
            pass

    async def _version(self, driver: AsyncDriver) -> str:
        info = await driver.get_server_info()
        return str(info.agent)

    async def stats(self, target: TargetConfig) -> dict[str, object]:
        async with self._driver(target) as (driver, db):
            nodes = (await self._data(driver, db, "MATCH (n) RETURN count(n) AS c"))[0]["c"]
            rels = (await self._data(driver, db, "MATCH ()-[r]->() RETURN count(r) AS c"))[0]["c"]
            labels = await self._data(driver, db, "MATCH (n) UNWIND labels(n) AS label "
                                                  "RETURN label, count(*) AS count ORDER BY label")
            types = await self._data(driver, db, "MATCH ()-[r]->() RETURN type(r) AS type, "
                                                 "count(*) AS count ORDER BY type")
            version = await self._version(driver)
        return {"engine": self.name, "server_version": version, "node_count": nodes,
                "relationship_count": rels, "labels": [row["label"] for row in labels],
                "relationship_types": [row["type"] for row in types],
                "label_counts": {row["label"]: row["count"] for row in labels},
                "relationship_type_counts": {row["type"]: row["count"] for row in types}}

    async def _schema(self, driver: AsyncDriver, db: str | None
                      ) -> tuple[list[str], list[str]]:
        """CREATE statements for constraints and (non-constraint) indexes."""
        stmts, names = [], []
        for c in await self._data(driver, db, "SHOW CONSTRAINTS"):
            labels, props = c.get("labelsOrTypes") or [], c.get("properties") or []
            if not labels or not props:
                continue
            pattern = (f"(n:{q(labels[0])})" if c.get("entityType") == "NODE"
                       else f"()-[n:{q(labels[0])}]-()")
            keys = ", ".join(f"n.{q(p)}" for p in props)
            keys = keys if len(props) == 1 else f"({keys})"
            kind = {"UNIQUENESS": "IS UNIQUE", "NODE_KEY": "IS NODE KEY",
                    "RELATIONSHIP_UNIQUENESS": "IS UNIQUE", "RELATIONSHIP_KEY": "IS REL KEY",
                    "NODE_PROPERTY_EXISTENCE": "IS NOT NULL",
                    "RELATIONSHIP_PROPERTY_EXISTENCE": "IS NOT NULL"}.get(str(c.get("type")))
            if kind is None:
                continue
            stmts.append(f"CREATE CONSTRAINT {q(c['name'])} IF NOT EXISTS FOR {pattern} "
                         f"REQUIRE {keys} {kind}")
            names.append(c["name"])
        for ix in await self._data(driver, db, "SHOW INDEXES"):
            if ix.get("owningConstraint") or ix.get("type") == "LOOKUP":
                continue
            labels, props = ix.get("labelsOrTypes") or [], ix.get("properties") or []
            if not labels or not props or str(ix.get("name", "")).startswith("safehold_import"):
                continue
            pattern = (f"(n:{q(labels[0])})" if ix.get("entityType") == "NODE"
                       else f"()-[n:{q(labels[0])}]-()")
            kind = {"TEXT": "TEXT ", "POINT": "POINT ", "FULLTEXT": None}.get(
                str(ix.get("type")), "")
            if kind is None:
                continue
            stmts.append(f"CREATE {kind}INDEX {q(ix['name'])} IF NOT EXISTS FOR {pattern} ON "
                         f"({', '.join(f'n.{q(p)}' for p in props)})")
        return stmts, names

    @asynccontextmanager
    async def dump(self, target: TargetConfig, progress: Progress,
                   options: DumpOptions | None = None) -> AsyncIterator[Dump]:
        use_apoc = bool((options or {}).get("use_apoc"))
        async with self._driver(target) as (driver, db):
            version = await self._version(driver)
            counts = (await self._data(driver, db, "MATCH (n) RETURN count(n) AS c"))[0]["c"]
            rel_count = (await self._data(driver, db,
                                          "MATCH ()-[r]->() RETURN count(r) AS c"))[0]["c"]
            progress.item_kind = "nodes+relationships"
            progress.set_phase(Phase.DUMPING, items_total=counts + rel_count)
            info: dict[str, object] = {"server_version": version, "counts": {"nodes": counts,
                                                          "relationships": rel_count},
                    "count_kind": "entities", "database": db,
                    "tool": "apoc.export.cypher.all" if use_apoc else "neo4j driver export"}
            chunks = (self._apoc_chunks(driver, db, progress) if use_apoc
                      else self._chunks(driver, db, progress))
            with dump_errors(target, "Neo4j", Neo4jError):
                yield Dump(chunks, info)

    async def _apoc_chunks(self, driver: AsyncDriver, db: str | None, progress: Progress
                           ) -> AsyncIterator[bytes]:
        async with driver.session(database=db) as s:
            try:
                result = await s.run("CALL apoc.export.cypher.all(null, {stream: true, "
                                     "format: 'cypher-shell', batchSize: 1000})")
                async for record in result:
                    text = record.get("cypherStatements") or ""
                    progress.items_done += int(record.get("nodes") or 0) + \
                        int(record.get("relationships") or 0)
                    if text:
                        yield text.encode()
            except Neo4jError as exc:
                text = str(exc).lower()
                if "apoc.export.cypher.all" in text and any(
                        w in text for w in ("unknown", "no procedure", "not found")):
                    raise BadRequest("APOC is not installed on this Neo4j server; back up "
                                     "without use_apoc", code="apoc_unavailable") from None
                raise

    async def _chunks(self, driver: AsyncDriver, db: str | None, progress: Progress
                      ) -> AsyncIterator[bytes]:
        schema, _ = await self._schema(driver, db)
        labels = [r["label"] for r in await self._data(
            driver, db, "MATCH (n) UNWIND labels(n) AS label RETURN DISTINCT label")]
        yield (b"// Safehold Neo4j backup: run with cypher-shell, or restore with Safehold\n"
               b"// 1. schema\n")
        for stmt in schema:
            yield f"{stmt};\n".encode()
        for label in labels:
            yield (f"CREATE INDEX {q('safehold_import_' + label)} IF NOT EXISTS FOR "
                   f"(n:{q(label)}) ON (n.{IMPORT_ID});\n").encode()
        yield b"// 2. nodes\n"
        groups: dict[str, list[str]] = {}
        async with driver.session(database=db, fetch_size=BATCH) as s:
            result = await s.run("MATCH (n) RETURN elementId(n) AS id, labels(n) AS labels, "
                                 "properties(n) AS p")
            async for record in result:
                key = _labels(record["labels"])
                rows = groups.setdefault(key, [])
                rows.append(_row({"id": record["id"]}, record["p"]))
                progress.items_done += 1
                if len(rows) >= BATCH:
                    yield self._create_nodes(key, rows)
                    groups[key] = []
        for key, rows in groups.items():
            if rows:
                yield self._create_nodes(key, rows)
        yield b"// 3. relationships\n"
        rgroups: dict[tuple[str, str, str], list[str]] = {}
        async with driver.session(database=db, fetch_size=BATCH) as s:
            result = await s.run(
                "MATCH (a)-[r]->(b) RETURN elementId(a) AS s, elementId(b) AS e, "
                "type(r) AS t, properties(r) AS p, labels(a) AS la, labels(b) AS lb")
            async for record in result:
                rkey = (record["t"], _first(record["la"]), _first(record["lb"]))
                rows = rgroups.setdefault(rkey, [])
                rows.append(_row({"s": record["s"], "e": record["e"]}, record["p"]))
                progress.items_done += 1
                if len(rows) >= BATCH:
                    yield self._create_rels(rkey, rows)
                    rgroups[rkey] = []
        for rkey, rows in rgroups.items():
            if rows:
                yield self._create_rels(rkey, rows)
        yield f"// 4. cleanup\n{FIX_BYTES_MARKER}\n".encode()
        for label in labels:
            yield (f"MATCH (n:{q(label)}) WHERE n.{IMPORT_ID} IS NOT NULL "
                   f"REMOVE n.{IMPORT_ID}, n.{BYTES_TAG};\n").encode()
        yield f"MATCH ()-[r]->() WHERE r.{BYTES_TAG} IS NOT NULL REMOVE r.{BYTES_TAG};\n".encode()
        for label in labels:
            yield f"DROP INDEX {q('safehold_import_' + label)} IF EXISTS;\n".encode()

    @staticmethod
    def _create_nodes(labels: str, rows: list[str]) -> bytes:
        return (f"UNWIND [{', '.join(rows)}] AS row CREATE (n{labels}) SET n = row.p, "
                f"n.{IMPORT_ID} = row.id, n.{BYTES_TAG} = row.b;\n").encode()

    @staticmethod
    def _create_rels(key: tuple[str, str, str], rows: list[str]) -> bytes:
        rtype, la, lb = key
        a = f"(a:{q(la)} {{{IMPORT_ID}: row.s}})" if la else f"(a {{{IMPORT_ID}: row.s}})"
        b = f"(b:{q(lb)} {{{IMPORT_ID}: row.e}})" if lb else f"(b {{{IMPORT_ID}: row.e}})"
        return (f"UNWIND [{', '.join(rows)}] AS row MATCH {a} MATCH {b} CREATE (a)-[r:{q(rtype)}]"
                f"->(b) SET r = row.p, r.{BYTES_TAG} = row.b;\n").encode()

    async def _clean(self, driver: AsyncDriver, db: str | None, progress: Progress) -> None:
        progress.set_phase(Phase.CLEANING)
        try:
            async with driver.session(database=db) as s:
                result = await s.run("MATCH (n) CALL { WITH n DETACH DELETE n } "
                                     "IN TRANSACTIONS OF 10000 ROWS")
                await result.consume()
        except ClientError:  # no CALL { } IN TRANSACTIONS here: a batched loop instead
            while True:
                deleted = (await self._data(driver, db, "MATCH (n) WITH n LIMIT 10000 "
                                            "DETACH DELETE n RETURN count(*) AS c"))[0]["c"]
                if not deleted:
                    break
        _, constraints = await self._schema(driver, db)
        for name in constraints:
            await self._data(driver, db, f"DROP CONSTRAINT {q(name)} IF EXISTS")
        for ix in await self._data(driver, db, "SHOW INDEXES"):
            if ix.get("owningConstraint") or ix.get("type") == "LOOKUP":
                continue
            await self._data(driver, db, f"DROP INDEX {q(ix['name'])} IF EXISTS")

    async def _fix_bytes(self, driver: AsyncDriver, db: str | None) -> None:
        """Turn integer lists tagged `_safehold_bytes` back into byte arrays."""
        for what, match in (("n", "MATCH (n)"), ("r", "MATCH ()-[r]->()")):
            rows = await self._data(
                driver, db, f"{match} WHERE {what}.{BYTES_TAG} IS NOT NULL "
                f"RETURN elementId({what}) AS id, {what}.{BYTES_TAG} AS names, "
                f"properties({what}) AS p")
            for row in rows:
                props = {k: bytes(row["p"][k]) for k in row["names"] if k in row["p"]}
                await self._data(driver, db, f"{match} WHERE elementId({what}) = $id "
                                 f"SET {what} += $props", id=row["id"], props=props)

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        splitter = StatementSplitter()
        async with self._driver(target) as (driver, db):
            with restore_errors(target, "Neo4j", Neo4jError, DriverError, UnicodeDecodeError):
                if clean:
                    await self._clean(driver, db, progress)
                progress.set_phase(Phase.RESTORING, bytes_total=count_in(manifest, "raw_bytes"))
                async for chunk in chunks:
                    progress.bytes_done += len(chunk)
                    for stmt in splitter.feed(decoder.decode(chunk)):
                        await self._execute(driver, db, stmt, splitter.lines.pop(0))
                        progress.items_done += 1
                for stmt in splitter.feed(decoder.decode(b"", final=True), final=True):
                    await self._execute(driver, db, stmt, splitter.lines.pop(0))
                    progress.items_done += 1

    async def _execute(self, driver: AsyncDriver, db: str | None, stmt: str,
                       line: int) -> None:
        """One statement, one transaction (each holds a batch of up to 1000 rows). The
        runner validated the whole script before the clean; checked again here, so nothing
        outside the exporter's shapes ever reaches the server."""
        # a long statement is checked off the event loop (the heartbeat must keep beating)
        why = (check_statement(stmt) if len(stmt) < 1 << 18
               else await asyncio.to_thread(check_statement, stmt))
        if why is not None:
            raise RestoreFailed(f"line {line}: refused statement ({why}): {stmt[:80]!r}",
                                code="unsafe_backup")
        if stmt == FIX_BYTES_MARKER:
            await self._fix_bytes(driver, db)
            return
        async with driver.session(database=db) as s:
            await s.execute_write(_run, stmt)


async def _run(tx: AsyncManagedTransaction, stmt: str) -> None:
    result = await tx.run(stmt)
    await result.consume()


def _first(labels: list[str]) -> str:
    return sorted(labels)[0] if labels else ""


