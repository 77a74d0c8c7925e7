"""MongoDB: PyMongo's `AsyncMongoClient` (motor reached end of life in 2026-05).

Backup: mongodump's directory layout inside a tar stream (gzipped by the pipeline →
`backup_mongodb_<ts>.tar.gz`): `prelude.json`, then per collection
`<db>/<coll>.metadata.json` (options, indexes, uuid, type — canonical Extended JSON as
mongodump writes it) and `<db>/<coll>.bson` (the raw BSON of `find_raw_batches`, never
decoded). `tar xzf f && mongorestore --drop <dir>` restores it with the stock tools.
A collection's BSON is spooled to a temp file first (a tar header needs the size), so
memory stays flat; disk use is the largest collection.

Consistency: all reads of a backup run in one snapshot session when the server supports
it (replica sets, MongoDB ≥ 5.0: a point-in-time copy of every collection); otherwise each
collection is read consistently on its own and the manifest says `per-collection`.

Restore streams the tar: a collection is dropped (clean), created with its options,
filled with `insert_many` of `RawBSONDocument` batches (ordered=False, ≤ 1000 docs /
8 MiB), then its indexes are built — after the data, as mongorestore does. Views last.

Target URL: `mongodb://[user@]host:port/[db[,db2…]][?options]` — the path names the
database(s) to back up (comma-separated), or all non-system databases when empty.
"""

from __future__ import annotations

import asyncio
import json
import struct
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from bson import json_util
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.cursor import AsyncRawBatchCursor
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import EngineError, PipelineError, RestoreFailed
from shared.formats.mongodb import check_mongo_member, check_mongo_metadata
from shared.formats.tarstream import Event as TarEvent
from shared.formats.tarstream import TarReader
from shared.jobs import Phase
from worker.engines import (
    NO_OPTIONS,
    Drill,
    Dump,
    DumpOptions,
    RestoreOptions,
    drill_name,
    dump_errors,
    restore_errors,
    stale_drills,
    unreachable,
    written,
)
from worker.progress import Progress

SYSTEM_DBS = {"admin", "local", "config"}
BLOCK = 512
BATCH_DOCS = 1000
BATCH_BYTES = 8 << 20
JSON_OPTS = json_util.CANONICAL_JSON_OPTIONS



def _split_url(target: TargetConfig) -> tuple[str, str | None, list[str]]:
    """(URL for pymongo without user or path, username, databases named in the path)."""
    u = urlsplit(target.url)
    host = u.hostname or "127.0.0.1"
    netloc = f"[{host}]" if ":" in host else host
    if u.port:
        netloc += f":{u.port}"
    clean = urlunsplit((u.scheme, netloc, "/", u.query, ""))
    dbs = [d for d in unquote(u.path.strip("/")).split(",") if d]
    return clean, unquote(u.username) if u.username else None, dbs


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * ((BLOCK - size % BLOCK) % BLOCK)


# a document as PyMongo gives it (document_class=dict): BSON values, typed by the server
MongoDoc = dict[str, Any]


def _metadata(name: str, info: MongoDoc, indexes: list[MongoDoc]) -> bytes:
    options = dict(info.get("options") or {})
    kind = "view" if info.get("type") == "view" or "viewOn" in options else info.get(
        "type", "collection")
    doc: dict[str, object] = {"indexes": indexes if kind != "view" else [],
                              "collectionName": name, "type": kind, "options": options}
    uuid = (info.get("info") or {}).get("uuid")
    if uuid is not None:
        doc["uuid"] = uuid.hex if hasattr(uuid, "hex") else str(uuid)
    return json_util.dumps(doc, json_options=JSON_OPTS).encode()


# set by a drill: restore every database of the backup under this prefix instead, and
# collect the scratch databases' names (no listDatabases privilege needed)
DRILL_DB_PREFIX: ContextVar[str | None] = ContextVar("safehold_drill_db_prefix", default=None)
DRILL_DBS: ContextVar[set[str] | None] = ContextVar("safehold_drill_dbs", default=None)
# a restore beside the live database: the backup's database loaded under another name


class MongoDB:
    name: ClassVar[str] = "mongodb"
    extension: ClassVar[str] = ENGINES["mongodb"].extension
    atomic_restore: ClassVar[bool] = False

    def client(self, target: TargetConfig) -> AsyncMongoClient[MongoDoc]:
        url, user, _ = _split_url(target)
        return AsyncMongoClient(
            url, serverSelectionTimeoutMS=10_000, document_class=dict, username=user or None,
            password=target.password.reveal() if target.password is not None else None)

    @asynccontextmanager
    async def connect(self, target: TargetConfig) -> AsyncIterator[AsyncMongoClient[MongoDoc]]:
        client = self.client(target)
        try:
            await client.admin.command("ping")
        except PyMongoError as exc:
            await client.close()
            raise unreachable(target, "MongoDB", exc) from None
        try:
            yield client
        finally:
            await client.close()

    async def _databases(self, client: AsyncMongoClient[MongoDoc], target: TargetConfig
                         ) -> list[str]:
        named = _split_url(target)[2]
        if named:
            return named
        try:
            return sorted(d for d in await client.list_database_names() if d not in SYSTEM_DBS)
        except PyMongoError as exc:
            raise EngineError(f"cannot list the databases ({exc}); name them in the target "
                              "URL's path: mongodb://host:27017/app,other",
                              code="list_databases_failed") from None

    async def _version(self, client: AsyncMongoClient[MongoDoc]) -> str:
        info = await client.admin.command("buildInfo")
        return str(info.get("version", "unknown"))

    async def ping(self, target: TargetConfig) -> None:
        async with self.connect(target):
            pass

    async def stats(self, target: TargetConfig) -> dict[str, object]:
        async with self.connect(target) as client:
            databases: list[dict[str, object]] = []
            out: dict[str, object] = {"engine": self.name, "server_version":
                                      await self._version(client), "databases": databases,
                                      "partial": False}
            for dbname in await self._databases(client, target):
                db = client[dbname]
                colls = []
                async for info in await db.list_collections():
                    entry: dict[str, object] = {"name": info["name"],
                                                "type": info.get("type")}
                    if "viewOn" in (info.get("options") or {}):
                        entry["type"] = "view"
                    else:
                        entry["documents_estimate"] = await db[info["name"]] \
                            .estimated_document_count()
                        try:
                            cs = await db.command("collStats", info["name"])
                            entry["size_bytes"] = cs.get("size")
                            entry["storage_bytes"] = cs.get("storageSize")
                        except PyMongoError as exc:
                            entry["size_bytes"] = None
                            entry["note"] = f"collStats unavailable: {exc}"[:200]
                            out["partial"] = True
                    colls.append(entry)
                databases.append({"name": dbname, "collections": colls})
        return out

    @asynccontextmanager
    async def dump(self, target: TargetConfig, progress: Progress,
                   options: DumpOptions | None = None) -> AsyncIterator[Dump]:
        async with self.connect(target) as client:
            version = await self._version(client)
            plan: list[tuple[str, MongoDoc]] = []
            total_docs = 0
            only = set((options or {}).get("tables") or [])  # a safety backup of some
            for dbname in await self._databases(client, target):
                async for info in await client[dbname].list_collections():
                    if info["name"].startswith("system.") or \
                            only and f"{dbname}.{info['name']}" not in only:
                        continue
                    plan.append((dbname, dict(info)))
                    if "viewOn" not in (info.get("options") or {}) and \
                            info.get("type") != "view":
                        total_docs += await client[dbname][info["name"]] \
                            .estimated_document_count()
            progress.item_kind = "collections"
            progress.set_phase(Phase.DUMPING, items_total=len(plan))
            counts: dict[str, int] = {}
            facts: dict[str, object] = {
                "server_version": version, "documents_estimate": total_docs,
                "tool": "pymongo find_raw_batches", "layout": "mongodump directory in a tar",
                "databases": sorted({d for d, _ in plan}),
                "collections": [f"{d}.{i['name']}" for d, i in plan],
                "counts": counts, "count_kind": "documents",
                **({"only_tables": sorted(only)} if only else {})}
            session = client.start_session(snapshot=True)
            facts["consistency"] = "snapshot"

            async def chunks() -> AsyncIterator[bytes]:
                prelude = json.dumps({"ServerVersion": version,
                                      "ToolVersion": "safehold"}).encode()
                yield _tar_header("prelude.json", len(prelude)) + prelude + _padding(len(prelude))
                for dbname, info in plan:
                    async for block in self._dump_collection(client, session, facts, dbname,
                                                             info, counts):
                        yield block
                    progress.items_done += 1
                yield b"\0" * (BLOCK * 2)

            try:
                with dump_errors(target, "MongoDB", PyMongoError):
                    yield Dump(chunks(), facts)
            finally:
                await session.end_session()

    async def _dump_collection(self, client: AsyncMongoClient[MongoDoc],
                               session: AsyncClientSession, facts: dict[str, object],
                               dbname: str, info: MongoDoc,
                               counts: dict[str, int]) -> AsyncIterator[bytes]:
        name = info["name"]
        coll = client[dbname][name]
        is_view = info.get("type") == "view" or "viewOn" in (info.get("options") or {})
        indexes = [] if is_view else [dict(ix) async for ix in await coll.list_indexes()]
        for ix in indexes:
            ix.pop("ns", None)
        meta = _metadata(name, info, indexes)
        yield _tar_header(f"{dbname}/{name}.metadata.json", len(meta)) + meta + _padding(len(meta))
        if is_view:
            return
        with tempfile.TemporaryFile(prefix="safehold-mongo-") as spool:
            docs = 0
            snapshot = facts.get("consistency") == "snapshot"
            try:
                cursor = coll.find_raw_batches(session=session if snapshot else None)
                async for batch in _raw(cursor):
                    await asyncio.to_thread(spool.write, batch)
                    docs += _count_docs(batch)
            except OperationFailure as exc:
                if not snapshot:
                    raise
                # no snapshot reads here (standalone server, stand-in): read each collection
                # consistently on its own instead
                facts["consistency"] = f"per-collection (snapshot reads refused: {exc.code})"
                await asyncio.to_thread(spool.seek, 0)
                await asyncio.to_thread(spool.truncate)
                docs = 0
                async for batch in _raw(coll.find_raw_batches()):
                    await asyncio.to_thread(spool.write, batch)
                    docs += _count_docs(batch)
            size = await asyncio.to_thread(spool.tell)
            counts[f"{dbname}.{name}"] = docs
            yield _tar_header(f"{dbname}/{name}.bson", size)
            await asyncio.to_thread(spool.seek, 0)
            while block := await asyncio.to_thread(spool.read, 1 << 20):
                yield block
            yield _padding(size)

    @property
    def drill(self) -> MongoDBDrill:
        return MongoDBDrill()

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        async with self.connect(target) as client:
            restorer = _Restorer(client, clean, progress)
            # a rollback's reach, where the failed load wrote
            restorer.databases |= {str(written(d)) for d in options.also_clean}
            # some collections only (issue 25): the others are neither read nor dropped
            restorer.only = {tuple(t.split(".", 1)) for t in options.tables} or None
            # metadata that passed the checks can still fail to apply (an invalid ObjectId,
            # an option of the wrong type): every such failure is a failed restore
            with restore_errors(target, "MongoDB", PyMongoError, BulkWriteError, BSONError,
                                ValueError, TypeError, AttributeError, KeyError):
                async for name, stream in _untar(chunks):
                    await restorer.entry(name, stream)
                await restorer.finish()
            if restorer.only and (missing := restorer.only - restorer.prepared - {
                    (d, c) for d, c, _ in restorer.views}):
                raise RestoreFailed("the backup holds no collection " + ", ".join(
                    sorted(".".join(m) for m in missing)), code="table_missing",
                    database_unchanged=not restorer.prepared)

    async def database_exists(self, target: TargetConfig, name: str) -> bool:
        async with self.connect(target) as client:  # a database is there when it holds some
            return bool(await client[name].list_collection_names())

    async def drop_database(self, target: TargetConfig, name: str) -> None:
        async with self.connect(target) as client:
            await client.drop_database(name)

    async def tables_present(self, target: TargetConfig, tables: Sequence[str]) -> list[str]:
        async with self.connect(target) as client:
            have = {f"{d}.{c}" for d in {t.split(".", 1)[0] for t in tables}
                    for c in await client[d].list_collection_names()}
        return [t for t in tables if t in have]


async def _raw(cursor: AsyncRawBatchCursor[MongoDoc]) -> AsyncIterator[bytes]:
    """A raw batch cursor's batches: BSON bytes (PyMongo's types say documents)."""
    async for batch in cursor:
        yield cast(bytes, batch)


def _count_docs(batch: bytes) -> int:
    n, at = 0, 0
    while at + 4 <= len(batch):
        at += struct.unpack_from("<i", batch, at)[0]
        n += 1
    return n


class _Stream:
    """The content of one tar member, pulled from the shared tar parser."""

    def __init__(self, next_event: Callable[[], Awaitable[TarEvent]], size: int) -> None:
        self._next, self.left, self.ended = next_event, size, False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.ended:
            kind, data = await self._next()
            if kind == "end" or not isinstance(data, bytes):
                self.ended = True
                return
            self.left -= len(data)
            yield data

    async def drain(self) -> None:
        async for _ in self.chunks():
            pass


async def _untar(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, _Stream]]:
    """Members of a tar stream, in order (`shared.formats.tarstream`: bounded headers)."""
    reader = TarReader()

    async def next_event() -> TarEvent:
        while (event := reader.next_event()) is None:
            chunk = await anext(chunks, None)
            if chunk is None:
                raise PipelineError("the tar stream ends early", code="corrupt_backup")
            reader.push(chunk)
        return event

    while True:
        kind, payload = await next_event()
        if kind == "eof":
            return
        if kind == "file" and isinstance(payload, tuple):
            name, size = payload
            stream = _Stream(next_event, size)
            yield name, stream
            await stream.drain()  # whatever the consumer did not read


class _Restorer:
    def __init__(self, client: AsyncMongoClient[MongoDoc], clean: bool, progress: Progress) -> None:
        self.client, self.clean, self.progress = client, clean, progress
        self.pending_indexes: list[tuple[str, str, list[MongoDoc]]] = []
        self.views: list[tuple[str, str, MongoDoc]] = []
        self.prepared: set[tuple[str, str]] = set()
        self.databases: set[str] = set()
        self.only: set[tuple[str, ...]] | None = None  # (db, collection) restored, if some
        progress.item_kind = "documents"

    async def _prepare(self, db: str, coll: str, options: MongoDoc | None) -> None:
        if (db, coll) in self.prepared:
            return
        self.prepared.add((db, coll))
        if self.clean:
            await self.client[db].drop_collection(coll)
        if options:
            await self.client[db].create_collection(coll, **options)

    async def entry(self, name: str, stream: _Stream) -> None:
        where = check_mongo_member(name)  # the whole file was checked before; again here
        if where is None:
            return  # prelude.json
        db, coll, kind = where
        if self.only is not None and (db, coll) not in self.only:
            return  # not asked for: left as it is
        db = f"{prefix}{db}" if (prefix := DRILL_DB_PREFIX.get()) else db
        db = str(written(db))
        if (scratch := DRILL_DBS.get()) is not None:
            scratch.add(db)
        self.databases.add(db)
        if kind == ".metadata.json":
            if stream.left > 16 << 20:
                raise PipelineError(f"{name}: metadata larger than 16 MiB",
                                    code="corrupt_backup")
            raw = b"".join([c async for c in stream.chunks()])
            check_mongo_metadata(name, raw)
            meta = json_util.loads(raw.decode())
            options = dict(meta.get("options") or {})
            if meta.get("type") == "view" or "viewOn" in options:
                self.views.append((db, coll, options))
                return
            await self._prepare(db, coll, options)
            indexes = [{k: v for k, v in ix.items() if k not in ("v", "ns")}
                       for ix in meta.get("indexes", []) if ix.get("name") != "_id_"]
            if indexes:
                self.pending_indexes.append((db, coll, indexes))
        else:
            await self._prepare(db, coll, None)
            await self._insert(db, coll, stream)

    async def _insert(self, db: str, coll: str, stream: _Stream) -> None:
        target = self.client[db][coll]
        buf = bytearray()
        batch: list[RawBSONDocument] = []
        size = 0
        async for chunk in stream.chunks():
            buf += chunk
            self.progress.bytes_done += len(chunk)
            at = 0
            while len(buf) - at >= 4:
                length = struct.unpack_from("<i", buf, at)[0]
                if length < 5:
                    raise PipelineError("corrupt BSON in the backup", code="corrupt_backup")
                if len(buf) - at < length:
                    break
                batch.append(RawBSONDocument(bytes(buf[at:at + length])))
                size += length
                at += length
                if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
                    await target.insert_many(batch, ordered=False)
                    self.progress.items_done += len(batch)
                    batch, size = [], 0
            del buf[:at]
        if buf:
            raise PipelineError("the BSON file ends inside a document", code="corrupt_backup")
        if batch:
            await target.insert_many(batch, ordered=False)
            self.progress.items_done += len(batch)

    async def finish(self) -> None:
        self.progress.set_phase(Phase.INDEXING)
        drill = DRILL_DB_PREFIX.get() is not None
        for db, coll, indexes in self.pending_indexes:
            if drill:  # a TTL index would delete documents from the copy while it is counted
                indexes = [{k: v for k, v in ix.items() if k != "expireAfterSeconds"}
                           for ix in indexes]
            await self.client[db].command("createIndexes", coll, indexes=indexes)
        for db, coll, options in self.views:
            if self.clean:
                await self.client[db].drop_collection(coll)
            await self.client[db].command({"create": coll, **options})
        if self.clean and self.only is None:
            await self._drop_extra()

    async def _drop_extra(self) -> None:
        """A clean restore leaves each backed-up database exactly as in the backup: what
        was created there after the backup goes (unlike `mongorestore --drop`, which only
        replaces the collections the dump holds)."""
        kept = self.prepared | {(db, coll) for db, coll, _ in self.views}
        for db in sorted(self.databases):
            for coll in await self.client[db].list_collection_names():
                if (db, coll) not in kept and not coll.startswith("system."):
                    await self.client[db].drop_collection(coll)


class MongoDBDrill(Drill):
    """Restore drills: every database of the backup restored as `safehold_drill_<hex>_<db>`
    on the same server (the target's user needs readWrite on those), exact documents per
    collection, dropped afterwards."""

    async def sweep(self, target: TargetConfig, max_age: float) -> list[str]:
        """Drop scratch databases a killed drill left behind (older than any drill runs)."""
        async with MongoDB().connect(target) as client:
            listed = await client.admin.command(
                "listDatabases", nameOnly=True,
                filter={"name": {"$regex": "^safehold_drill_"}})
            stale = stale_drills([d["name"] for d in listed["databases"]], max_age)
            for db in stale:
                await client.drop_database(db)
        return stale

    @asynccontextmanager
    async def scratch(self, target: TargetConfig) -> AsyncIterator[TargetConfig]:
        prefix = f"{drill_name()}_"
        self.last_scratch = f"databases {prefix}<db>"
        token = DRILL_DB_PREFIX.set(prefix)
        made: set[str] = set()
        dbs_token = DRILL_DBS.set(made)
        try:
            yield target
        finally:
            DRILL_DB_PREFIX.reset(token)
            DRILL_DBS.reset(dbs_token)
            async with MongoDB().connect(target) as client:
                for db in sorted(made):
                    await client.drop_database(db)

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        prefix = DRILL_DB_PREFIX.get() or ""
        out: dict[str, int] = {}
        async with MongoDB().connect(target) as client:
            for db in sorted(DRILL_DBS.get() or ()):
                for info in await (await client[db].list_collections()).to_list(None):
                    if info.get("type") == "view" or info["name"].startswith("system."):
                        continue
                    n = 0  # counted from the documents themselves, not collection stats
                    async for batch in _raw(client[db][info["name"]].find_raw_batches(
                            {}, {"_id": 1})):
                        n += _count_docs(batch)
                    out[f"{db[len(prefix):]}.{info['name']}"] = n
        return out

    async def check(self, target: TargetConfig, sql: str) -> bool:
        raise EngineError("verify_checks are SQL; MongoDB drills compare documents per "
                          "collection")
