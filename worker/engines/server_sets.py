"""Server targets (issue 21): a PostgreSQL or MySQL/MariaDB target with `databases = "*"`
(or a list, less `exclude`) is backed up as one set — each database dumped in turn, each
consistent in itself, exactly as a one-database backup of it (its globals head included),
in one file (format and checks: shared/backup_sets.py). The databases are listed at each
backup: one created since the last is in the next set, without a config change.

A restore loads every member, or only `database`, each into the database of the same name
(created first when the server lacks it: a new server), each with the engine's own
one-database restore (its clean, guard, roles choice, transaction). Databases of the server
that are not in the set are never touched. The bytes were all checked before the first
member loads (procedures), because a set commits database by database.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any, ClassVar, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

from shared import backup_sets
from shared.config import TargetConfig
from shared.errors import DumpFailed, RestoreFailed
from worker.engines import DRILL_PREFIX, Dump, DumpOptions, RestoreOptions, RowCounter
from worker.progress import Progress

# what a member's manifest entry keeps of its one-database dump
MEMBER_FACTS = ("roles", "globals", "counts", "count_kind", "exact_counts", "exact_count_kind",
                "exact_sizes",
                "invalid_views", "server_version",
                "database_owner", "database_options")


class SetEngine(Protocol):
    name: ClassVar[str]

    async def server_databases(self, target: TargetConfig) -> list[str]: ...

    async def create_database(self, target: TargetConfig, name: str, facts: Mapping[str, object],
                              progress: Progress) -> bool:
        """Create database `name` on the set `target`'s server if it lacks it (True)."""

    async def drop_database(self, target: TargetConfig, name: str) -> None:
        """Drop database `name` (one this restore created)."""

    async def database_restored(self, target: TargetConfig, name: str,
                                facts: Mapping[str, object]) -> None:
        """After a member's load: what the database itself carries (its owner)."""

    async def precheck(self, target: TargetConfig, facts: Mapping[str, object],
                       options: RestoreOptions) -> None:
        """Refuse (RestoreFailed, unchanged) what the member's load would refuse about
        roles or accounts, from its manifest entry, before any member loads."""

    def dump(self, target: TargetConfig, progress: Progress,
             options: DumpOptions | None = None) -> AbstractAsyncContextManager[Dump]: ...

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions = ...) -> None: ...

    def row_counter(self) -> RowCounter: ...

    async def stats(self, target: TargetConfig) -> dict[str, object]: ...


def member_target(target: TargetConfig, name: str) -> TargetConfig:
    """The set's target, pointed at one of its databases (a one-database target)."""
    u = urlsplit(target.url)
    return replace(target, url=urlunsplit((u.scheme, u.netloc, "/" + quote(name, safe=""),
                                           u.query, "")),
                   databases=(), exclude=(), globals=True)


SYSTEM = {"postgresql": {"template0", "template1"},
          "mysql": {"mysql", "sys", "information_schema", "performance_schema"}}


def refused(target: TargetConfig, engine: str, name: str) -> str | None:
    """Why database `name` is outside what this server target may write, or None. MySQL
    names are compared case-folded (with lower_case_table_names, `MySQL` is `mysql`)."""
    def fold(n: str) -> str:
        return n.lower() if engine == "mysql" else n
    if fold(name) in SYSTEM.get(engine, ()):
        return "a system database"
    if fold(name).startswith(DRILL_PREFIX):
        return "a drill's scratch copy"
    if name.startswith("-"):
        return "a name that reads like a command-line option"
    if target.databases != ("*",) and fold(name) not in {fold(d) for d in target.databases}:
        return f"not one of target '{target.id}''s databases"
    if fold(name) in {fold(d) for d in target.exclude}:
        return f"excluded by target '{target.id}'"
    return None


def check_members(target: TargetConfig, engine: str, names: list[str]) -> None:
    """A set's databases (from its file or its manifest, both untrusted) must all be ones
    this target may write: else the restore is refused before anything changes."""
    bad = {n: why for n in names if (why := refused(target, engine, n))}
    if bad:
        raise RestoreFailed("the backup set holds database(s) this target may not write: "
                            + "; ".join(f"{n!r} ({why})" for n, why in list(bad.items())[:20])
                            + ". Nothing was changed", database_unchanged=True,
                            code="database_refused")


async def members_of(engine: SetEngine, target: TargetConfig,
                     progress: Progress | None = None) -> list[str]:
    """The databases this backup takes: every one of the server (less system databases,
    drills' scratch copies and names that read like options) or the ones named, less
    `exclude`, in a stable order."""
    present = await engine.server_databases(target)
    if target.databases == ("*",):
        wanted = []
        for d in present:
            why = refused(target, engine.name, d)
            if why is None:
                wanted.append(d)
            elif why.startswith("a name that") and progress is not None:
                progress.warn(f"database {d!r} left out of the set: {why}")
    else:
        absent = [d for d in target.databases if d not in present]
        if absent:
            raise DumpFailed(f"target '{target.id}' names database(s) the server does not "
                             f"have: {', '.join(absent)}", code="database_missing")
        wanted = list(target.databases)
        if odd := [d for d in wanted if refused(target, engine.name, d) and
                   d not in target.exclude]:
            raise DumpFailed(f"target '{target.id}' names database(s) a set cannot hold: "
                             f"{', '.join(odd)}", code="database_refused")
    names = [d for d in wanted if d not in target.exclude]
    if not names:
        raise DumpFailed(f"target '{target.id}' has no database to back up (all excluded)",
                         code="database_missing")
    return names


def _whole(value: object) -> int:
    """A count an engine reported, or 0 when it has none."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


async def stats_set(engine: SetEngine, target: TargetConfig) -> dict[str, object]:
    """What the next set would hold: each database's size and tables."""
    found = [await engine.stats(member_target(target, name))
             for name in await members_of(engine, target)]
    return {"engine": engine.name,
            "server_version": found[0].get("server_version") if found else None,
            "size_bytes": sum(_whole(f.get("size_bytes")) for f in found),
            "table_count": sum(_whole(f.get("table_count")) for f in found),
            "databases": [{"database": f.get("database"), "size_bytes": f.get("size_bytes"),
                           "table_count": f.get("table_count")} for f in found]}


@asynccontextmanager
async def dump_set(engine: SetEngine, target: TargetConfig, progress: Progress,
                   options: DumpOptions | None = None) -> AsyncIterator[Dump]:
    names = await members_of(engine, target, progress)
    token = secrets.token_hex(8)
    members: list[dict[str, Any]] = []
    info: dict[str, Any] = {"set": {"token": token, "members": members},
                            "count_kind": None}

    async def chunks() -> AsyncIterator[bytes]:
        yield backup_sets.header(token, engine.name, names)
        for n, name in enumerate(names, 1):
            progress.log(f"database {name} ({n} of {len(names)})")
            yield backup_sets.member_line(token, name)
            counter = engine.row_counter()
            last = b"\n"
            async with engine.dump(member_target(target, name), progress, options) as d:
                async for chunk in d.chunks:
                    counter.feed(chunk)
                    last = chunk[-1:] or last
                    yield chunk
            if last != b"\n":
                yield b"\n"  # the next marker starts a line
            facts = {**d.info, **counter.result()}
            members.append({"database": name,
                            **{k: facts[k] for k in MEMBER_FACTS if k in facts}})
            for k in ("server_version", "tool", "tool_version", "options"):
                info.setdefault(k, d.info.get(k))
        yield backup_sets.end_line(token)

    yield Dump(chunks(), info)


async def restore_set(engine: SetEngine, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions) -> None:
    """Every member (or `options.database`), in file order. Before any loads: the names
    (file and manifest agree, procedures checked) are ones this target may write, and each
    member's roles choice holds. A member that fails after others loaded leaves the set
    partly restored (the runner rolls it back from the safety backup); a database this
    restore created is dropped again."""
    token = backup_sets.token_of(manifest)
    if token is None:
        raise RestoreFailed(f"target '{target.id}' is a server target and this backup is "
                            "not a set; nothing was changed", database_unchanged=True,
                            code="engine_mismatch")
    known = {name: m for m in backup_sets.member_entries(manifest) or []
             if isinstance(name := m.get("database"), str)}
    names = list(known)
    only = options.database
    if only is not None and only not in known:
        raise RestoreFailed(f"the backup set has no database {only!r} (it holds "
                            f"{', '.join(sorted(known)) or 'none'}); nothing was changed",
                            database_unchanged=True, code="database_missing")
    wanted = [only] if only is not None else names
    check_members(target, engine.name, wanted)
    member_options = replace(options, database=None)
    for name in wanted:  # the roles choice of every member, before any loads
        try:
            await engine.precheck(target, {**known[name], "database": name}, member_options)
        except RestoreFailed as exc:
            raise RestoreFailed(f"database {name}: {exc.message}", database_unchanged=True,
                                code=exc.code) from None
    done: list[str] = []
    created: list[str] = []
    try:
        async for name, body in backup_sets.members(chunks, token):
            if name not in known:
                raise RestoreFailed(f"the set's file holds database {name!r}, which its "
                                    "manifest does not list", code="corrupt_backup",
                                    database_unchanged=not done and not created)
            if name not in wanted:
                continue  # its bytes pass unread (they were checked with the rest)
            facts = {**known[name], "database": name}
            progress.log(f"restoring database {name}")
            try:
                if await engine.create_database(target, name, facts, progress):
                    created.append(name)
                await engine.restore(member_target(target, name), body, progress,
                                     clean=clean, manifest=facts, options=member_options)
                await engine.database_restored(target, name, facts)
            except RestoreFailed as exc:
                if not done and exc.database_unchanged and name not in created:
                    raise RestoreFailed(f"database {name}: {exc.message}",
                                        database_unchanged=True, code=exc.code) from None
                raise RestoreFailed(
                    f"database {name} failed ({exc.message})"
                    + (f"; restored before it: {', '.join(done)}" if done else ""),
                    code=exc.code) from None
            done.append(name)
    except BaseException:
        for name in created:  # it did not exist before this restore
            try:
                await engine.drop_database(target, name)
                progress.warn(f"dropped database {name}, which this failed restore created")
            except Exception as exc:  # noqa: BLE001 — said, never hidden
                progress.warn(f"database {name}, created by this failed restore, could not "
                              f"be dropped ({type(exc).__name__}: {exc})")
        raise
    if only is not None and only not in done:
        raise RestoreFailed(f"the backup set holds no database {only!r}; nothing was "
                            "changed", database_unchanged=True, code="database_missing")
    if only is None:
        progress.log(f"restored {len(done)} database(s): {', '.join(done)}")
