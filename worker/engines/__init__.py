"""Engines: one module per database behind one small interface, one registry.

An engine translates driver and tool errors at its edge into `shared.errors` classes
(`DumpFailed`, `RestoreFailed`, `ToolTooOld`, `EngineError`), most specific first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from shared.config import TargetConfig
from worker.progress import Progress


@dataclass
class Dump:
    """An open dump: `chunks` yields the plain dump; `info` goes into the manifest."""

    chunks: AsyncIterator[bytes]
    info: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    name: ClassVar[str]
    extension: ClassVar[str]

    def dump(self, target: TargetConfig, progress: Progress,
             options: dict[str, Any] | None = None) -> AbstractAsyncContextManager[Dump]:
        """Stream a dump; leaving the context reaps every child and raises DumpFailed if the
        dump did not complete. `options` are engine-specific (e.g. redis `format`); a
        Dump's `info["extension"]` overrides the engine's file extension."""
        ...

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: dict[str, Any]) -> None:
        """Load a plain dump; raises RestoreFailed (with `database_unchanged` when known)."""
        ...

    async def stats(self, target: TargetConfig) -> dict[str, Any]: ...

    async def ping(self, target: TargetConfig) -> None: ...


def get_engines() -> dict[str, Engine]:
    from worker.engines.mongodb import MongoDB
    from worker.engines.mysql import MySQL
    from worker.engines.neo4j import Neo4j
    from worker.engines.postgresql import PostgreSQL
    from worker.engines.redis import RedisEngine
    from worker.engines.sqlite import SQLite

    engines: list[Engine] = [PostgreSQL(), MySQL(), SQLite(), RedisEngine(), MongoDB(),
                             Neo4j()]
    return {e.name: e for e in engines}
