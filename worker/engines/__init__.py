"""Engines: one module per database behind one small interface, one registry.

An engine translates driver and tool errors at its edge into `shared.errors` classes
(`DumpFailed`, `RestoreFailed`, `ToolTooOld`, `EngineError`), most specific first, through
the two helpers here: `unreachable()` for a failed connection and `restore_errors()` around
a load. Messages are redacted of the target's secrets.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypedDict, runtime_checkable

from shared.config import TargetConfig
from shared.errors import DumpFailed, EngineError, PipelineError, RestoreFailed
from shared.redact import redact
from worker.progress import Progress


def unreachable(target: TargetConfig, engine: str, exc: BaseException,
                where: str = "") -> EngineError:
    """The error for a connection to `target` that failed with `exc`."""
    detail = redact(str(exc) or type(exc).__name__, target.secrets())
    return EngineError(f"cannot connect to {engine} target '{target.id}'"
                       f"{' at ' + where if where else ''}: {detail}",
                       code="target_unreachable")


@contextmanager
def dump_errors(target: TargetConfig, engine: str,
                *driver_errors: type[BaseException]) -> Iterator[None]:
    """Around a dump read through a driver: its errors become DumpFailed, with the
    target's secrets taken out of the message."""
    try:
        yield
    except driver_errors as exc:
        raise DumpFailed(f"{engine} dump failed: "
                         f"{redact(str(exc), target.secrets())[:500]}") from None


@contextmanager
def restore_errors(target: TargetConfig, engine: str,
                   *driver_errors: type[BaseException]) -> Iterator[None]:
    """Around a load that changes the database as it goes: the driver's errors and a
    failing source become RestoreFailed (the runner then rolls back from the safety
    backup)."""
    try:
        yield
    except PipelineError as exc:
        raise RestoreFailed(f"reading the backup failed ({exc.message}) after the restore "
                            "had started", code=exc.code) from None
    except driver_errors as exc:
        raise RestoreFailed(f"{engine} restore failed: "
                            f"{redact(str(exc), target.secrets())[:500]}") from None


DRILL_PREFIX = "safehold_drill_"
_DRILL_NAME = re.compile(rf"{DRILL_PREFIX}([0-9a-f]{{8,}})_[0-9a-f]{{8}}(?:_.*)?", re.S)


def drill_name() -> str:
    """A scratch database name for a restore drill that carries its creation time, so a
    later drill can tell a copy leaked by a killed worker (older than any verify job may
    run) from one still in use: `safehold_drill_<unix time, hex>_<random>`."""
    return f"{DRILL_PREFIX}{int(time.time()):08x}_{secrets.token_hex(4)}"


def stale_drills(names: Iterable[str], max_age: float) -> list[str]:
    """The drill scratch names among `names` created more than `max_age` seconds ago."""
    now = time.time()
    out = []
    for name in names:
        m = _DRILL_NAME.fullmatch(name)
        if m and now - int(m.group(1), 16) > max_age:
            out.append(name)
    return sorted(out)


@dataclass(frozen=True)
class RestoreOptions:
    """What the caller chose for a load (the job's parameters, never the backup's)."""

    terminate: bool = False  # end the application's sessions instead of waiting for them
    # roles the backup names and the server lacks: "create" them (NOLOGIN), or "skip"
    # owners and grants; None: refuse before anything changes (PostgreSQL)
    roles: str | None = None
    owner_map: tuple[tuple[str, str], ...] = ()  # roles = "map": (old, new) pairs
    # a drill's scratch copy: the server's accounts and grants are never touched (MySQL
    # grants live outside the database and would outlive the copy)
    scratch: bool = False
    database: str | None = None  # a backup set: restore only this database of it
    # a rollback's reach: databases the failed load may have written where the safety
    # backup has nothing (Redis db numbers, MongoDB names); they are cleaned too. Worker
    # control data, so it travels here, never in a (stored, untrusted) manifest
    also_clean: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()  # only these tables (issue 25), schema.table
    keys: tuple[str, ...] = ()  # Redis: only the keys these patterns match (issue 25)


NO_OPTIONS = RestoreOptions()
# a restore beside the live database (issue 25): each database of the backup -> the one the
# load writes instead (MongoDB names, Redis indexes as text). The load, its flush, a
# rollback's reach and the check of what the file may write all follow it
INTO: ContextVar[dict[str, str] | None] = ContextVar("safehold_into", default=None)


def written(database: object) -> object:
    """Where a backup's `database` is loaded (INTO), of the same type."""
    into = (INTO.get() or {}).get(str(database))
    return database if into is None else type(database)(into)  # type: ignore[call-arg]

class Blocker(TypedDict):
    """A session holding a lock the restore waits for (shown in `waiting_for`)."""

    id: int  # the server's session id (pid, connection id)
    user: str | None
    application: str | None
    client: str | None  # where it connects from
    state: str | None
    since: str | None  # when its transaction (or state) began, RFC 3339


def describe(blockers: list[Blocker]) -> str:
    """`pid 4711 (user app, application "web", idle in transaction since 12:00:01)`…"""
    out = []
    for b in blockers:
        facts = [f"user {b.get('user') or '?'}"]
        if b.get("application"):
            facts.append(f"application {b['application']!r}")
        if b.get("client"):
            facts.append(f"from {b['client']}")
        if b.get("state"):
            facts.append(str(b["state"]) + (f" since {b['since']}" if b.get("since") else ""))
        out.append(f"session {b.get('id')} ({', '.join(facts)})")
    return "; ".join(out)


async def watch_blockers(find: Callable[[], Awaitable[list[Blocker]]],
                         end: Callable[[list[Blocker]], Awaitable[None]] | None,
                         progress: Progress, seen: list[Blocker],
                         every: float = 1.0) -> None:
    """Until cancelled: ask `find()` which sessions block the restore; show them in the
    job's progress (`waiting_for`) and events when they change; with `end` (the caller
    asked to terminate connections), end them. `seen` keeps the last ones found, for the
    error if the wait times out."""
    shown: list[str] = []
    while True:
        try:
            blockers = await find()
        except Exception as exc:  # a look that failed is no reason to fail the restore
            progress.log(f"could not look for sessions blocking the restore: {exc}")
            return
        ids = sorted(str(b.get("id")) for b in blockers)
        if blockers:
            seen[:] = blockers
        progress.waiting_for = blockers or None
        if ids != shown:
            if blockers:
                progress.log("the restore waits for locks held by "
                             f"{describe(blockers)}"
                             + ("; ending them (terminate_connections)" if end else ""))
            elif shown:
                progress.log("the restore has the locks it waited for")
            shown = ids
        if blockers and end is not None:
            await end(blockers)
        await asyncio.sleep(every)


@asynccontextmanager
async def blockers_watched(progress: Progress, seen: list[Blocker],
                           find: Callable[[], Awaitable[list[Blocker]]],
                           end: Callable[[list[Blocker]], Awaitable[None]],
                           others: Callable[[], Awaitable[list[Blocker]]] | None
                           ) -> AsyncIterator[None]:
    """Around a load: `watch_blockers` runs; with `others` (terminate_connections asked),
    the database's other sessions are ended first and blockers as they appear (each
    session once: one that cannot be ended is said once, not every second)."""
    tried: set[int] = set()

    async def end_once(blockers: list[Blocker]) -> None:
        new = [b for b in blockers if b.get("id") not in tried]
        tried.update(b.get("id") for b in new)
        if new:
            await end(new)

    if others is not None and (found := await others()):
        progress.log(f"ending {len(found)} session(s) on the database "
                     f"(terminate_connections): {describe(found)}")
        await end_once(found)
    watcher = asyncio.ensure_future(
        watch_blockers(find, end_once if others is not None else None, progress, seen))
    try:
        yield
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        progress.waiting_for = None


@dataclass
class Dump:
    """An open dump: `chunks` yields the plain dump; `info` goes into the manifest."""

    chunks: AsyncIterator[bytes]
    info: dict[str, object] = field(default_factory=dict)


class RowCounter(Protocol):
    """Exact counts taken from a dump stream as it passes (PostgreSQL's COPY blocks,
    MySQL's INSERT tuples): fed every chunk, asked once at the end for the manifest's
    facts (`exact_counts`, `count_kind`)."""

    def feed(self, data: bytes) -> None: ...

    def result(self) -> dict[str, object]: ...


class Drill:
    """A restore drill's scratch place, for engines that have one (see `Drillable`).

    An engine's drill subclasses this and implements `scratch` (an async context that
    yields a TargetConfig pointing at a fresh scratch copy and removes it on exit),
    `exact_counts` and `check`. The defaults cover what only some engines need."""

    last_scratch: str | None = None  # where the last scratch copy was (said in the result)
    skipped: str | None = None  # what a drill leaves out of the restore, if anything

    async def sweep(self, target: TargetConfig, max_age: float) -> list[str]:
        """Drop scratch copies a killed drill left behind (older than `max_age` seconds);
        return their names. Default: nothing to sweep (the place dies with the worker)."""
        return []

    def restore_filter(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The dump as the scratch restore gets it (default: unchanged; MySQL leaves
        events out, and says so in `skipped`)."""
        return chunks

    def scratch(self, target: TargetConfig) -> AbstractAsyncContextManager[TargetConfig]:
        raise NotImplementedError

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        raise NotImplementedError

    async def check(self, target: TargetConfig, sql: str) -> bool:
        """A `verify_checks` statement run against the scratch copy: true or false."""
        raise NotImplementedError


@runtime_checkable
class Drillable(Protocol):
    """An engine whose backups can be restored into a scratch place and counted. Engines
    without one (Neo4j Community: one database) get the content check only."""

    @property
    def drill(self) -> Drill: ...


@runtime_checkable
class RowCounting(Protocol):
    """An engine that counts rows from its own dump stream at backup time."""

    def row_counter(self) -> RowCounter: ...


class DumpOptions(TypedDict, total=False):
    """What a backup job may ask of an engine's dump (JobParams carries them)."""

    format: str  # another format the engine offers (naming.ENGINE_FORMATS), e.g. redis rdb
    use_apoc: bool  # neo4j: export through APOC
    tables: list[str]  # only these tables (a safety backup before a tables restore)


class Engine(Protocol):
    name: ClassVar[str]
    extension: ClassVar[str]
    # True when a restore changes nothing until it commits at the very end (PostgreSQL's
    # one transaction, SQLite's atomic file replace): such a restore checks its input as it
    # streams. Otherwise the whole file is checked before the clean starts.
    atomic_restore: ClassVar[bool]

    def dump(self, target: TargetConfig, progress: Progress,
             options: DumpOptions | None = None) -> AbstractAsyncContextManager[Dump]:
        """Stream a dump; leaving the context reaps every child and raises DumpFailed if the
        dump did not complete. `options` are engine-specific (e.g. redis `format`, which
        is also the file extension: `naming.ENGINE_FORMATS`)."""
        ...

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        """Load a plain dump; raises RestoreFailed (with `database_unchanged` when known).
        Where the application's locks can hold a load up (PostgreSQL, MySQL), it waits at
        most `target.lock_timeout` for them, naming the sessions that hold them
        (`watch_blockers`); `options` are the caller's choices (RestoreOptions)."""
        ...

    async def stats(self, target: TargetConfig) -> dict[str, object]: ...

    async def ping(self, target: TargetConfig) -> None: ...


# name -> (module, class): one module per engine, imported only when a target uses it
# (each pulls in its driver; an idle worker for PostgreSQL need not load PyMongo)
ENGINE_CLASSES: dict[str, tuple[str, str]] = {
    "postgresql": ("worker.engines.postgresql", "PostgreSQL"),
    "mysql": ("worker.engines.mysql", "MySQL"),
    "sqlite": ("worker.engines.sqlite", "SQLite"),
    "redis": ("worker.engines.redis", "RedisEngine"),
    "mongodb": ("worker.engines.mongodb", "MongoDB"),
    "neo4j": ("worker.engines.neo4j", "Neo4j"),
}


def get_engines(names: Iterable[str] | None = None) -> dict[str, Engine]:
    """Instances of the named engines (all when `names` is None)."""
    wanted = set(ENGINE_CLASSES) if names is None else set(names) & set(ENGINE_CLASSES)
    out: dict[str, Engine] = {}
    for name in sorted(wanted):
        module, cls = ENGINE_CLASSES[name]
        out[name] = getattr(importlib.import_module(module), cls)()
    return out
