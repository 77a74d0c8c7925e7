"""Test doubles for the procedures (tests/fast/test_procedures.py): an engine over an
in-memory keyspace and the job store's calls the procedures make, in memory. With
tests/memstore.py they run a backup, a restore, its safety backup and its rollback through
the real procedure code in milliseconds, no server involved.

The fake engine says it is Redis and writes what Safehold's Redis engine writes (a RESP
stream of `SELECT` and `RESTORE key 0 payload REPLACE`), so its backups pass the same
content check as any Redis backup; only the database behind it is a dict."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, ClassVar

from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import RestoreFailed
from shared.formats.resp import RespReader, resp
from shared.jobs import Job
from worker.engines import NO_OPTIONS, Drill, Dump, RestoreOptions
from worker.progress import Progress


class FakeEngine:
    """A keyspace (`data`) dumped and loaded like Redis, non-atomically (a load that fails
    half way leaves half of it), with the faults a test asks for."""

    name: ClassVar[str] = "redis"
    extension: ClassVar[str] = ENGINES["redis"].extension
    atomic_restore: ClassVar[bool] = False

    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = data
        self.scratches: dict[str, dict[bytes, bytes]] = {}  # a drill's, by scratch url
        self.lose_in_scratch: bytes | None = None  # a key a scratch restore "loses"
        self.fail_loads_after: list[int | None] = []  # per load, in order: keys before failing
        self.refuse_loads = 0  # loads that fail before touching anything
        self.dump_gate: asyncio.Event | None = None  # a dump waits here before each key
        self.dumping = asyncio.Event()  # set once a dump has started
        self.loads = 0

    @asynccontextmanager
    async def dump(self, target: TargetConfig, progress: Progress,
                   options: dict[str, Any] | None = None) -> AsyncIterator[Dump]:
        snapshot = dict(self.data)

        async def chunks() -> AsyncIterator[bytes]:
            self.dumping.set()
            yield resp(b"SELECT", b"0")
            for key, value in sorted(snapshot.items()):
                if self.dump_gate is not None:
                    await self.dump_gate.wait()
                yield resp(b"RESTORE", key, b"0", value, b"REPLACE")

        yield Dump(chunks(), {"server_version": "fake 1.0", "keys": len(snapshot),
                              "exact_counts": counts_of(snapshot),
                              "exact_count_kind": "keys"})

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: dict[str, Any],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        self.loads += 1
        if self.refuse_loads:
            self.refuse_loads -= 1
            raise RestoreFailed("the fake server refused the load before it began",
                                database_unchanged=True)
        scratch = target.url in self.scratches
        space = self.scratches[target.url] if scratch else self.data
        fail_after = None if scratch or not self.fail_loads_after else \
            self.fail_loads_after.pop(0)
        if clean:
            space.clear()
        reader, loaded = RespReader(max_parts=6, keep=1 << 20), 0
        async for chunk in chunks:
            for command in reader.feed(chunk):
                if command[0] != b"RESTORE":
                    continue
                if fail_after is not None and loaded >= fail_after:
                    raise RestoreFailed("the fake server went away in the middle of the load")
                if not (scratch and command[1] == self.lose_in_scratch):
                    space[command[1]] = command[3]
                loaded += 1

    @property
    def drill(self) -> FakeDrill:
        return FakeDrill(self)

    async def stats(self, target: TargetConfig) -> dict[str, Any]:
        return {"engine": self.name, "keys": len(self.data)}

    async def ping(self, target: TargetConfig) -> None:
        return None


def counts_of(space: Mapping[bytes, bytes]) -> dict[str, int]:
    """Keys per "table" (the part of a key before its first `:`)."""
    out: dict[str, int] = {}
    for key in space:
        table = key.split(b":", 1)[0].decode()
        out[table] = out.get(table, 0) + 1
    return out


class FakeDrill(Drill):
    """Scratch keyspaces beside the live one: restored into, counted, checked, dropped."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def scratch(self, target: TargetConfig) -> AsyncIterator[TargetConfig]:
        url = f"redis://scratch-{len(self.engine.scratches)}/0"
        self.engine.scratches[url] = {}
        self.last_scratch = url
        try:
            yield replace(target, url=url)
        finally:
            del self.engine.scratches[url]

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        return counts_of(self.engine.scratches[target.url])

    async def check(self, target: TargetConfig, sql: str) -> bool:
        """A "check" here names a key that must exist in the scratch copy."""
        return sql.encode() in self.engine.scratches[target.url]


class MemoryJobs:
    """The job store calls the procedures make (find, set_fields, publish, name claims,
    active jobs), on jobs held in memory; `events` keeps what was published."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.events: list[tuple[str, str, Mapping[str, Any]]] = []
        self.claims: dict[tuple[str, str], str] = {}

    def add(self, job: Job) -> Job:
        self.jobs[job.id] = job
        return job

    async def find(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    async def set_fields(self, job_id: str, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self.jobs[job_id], key, value)

    async def publish(self, job_id: str, type_: str, data: Mapping[str, Any], *,
                      progress: Mapping[str, Any] | None = None) -> None:
        self.events.append((job_id, type_, dict(data)))

    def name_claimer(self, target: str, owner: str) -> Callable[[str], Awaitable[bool]]:
        async def claim(filename: str) -> bool:
            return self.claims.setdefault((target, filename), owner) == owner
        return claim

    async def active_for_target(self, target: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.target == target and not j.terminal]

    def logged(self, job_id: str) -> list[str]:
        return [str(d.get("message")) for j, t, d in self.events if j == job_id and t == "log"]
