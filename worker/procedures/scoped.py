"""Restores that touch only what is asked (issue 25): into a new database beside the live
one (`into_database`), which is never touched.

PostgreSQL and MySQL/MariaDB: the database is created on the same server as it was dumped
(encoding, locale), the backup loaded into it through the ordinary guarded restore (verified
input, the engine's own transaction and guards), its owner set after the load; a failure
drops the database again, so the server is as it was. An existing database is refused
(database_exists) unless `replace`: then it is restored like a live one, its safety backup
first. SQLite: a new file next to the target's, with its mode and owner. MongoDB: the
backup's one database under the new name. Redis: the backup's one database index into
another index on the same server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

from shared import naming
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import RestoreFailed, SafeholdError
from shared.jobs import Job, JobParams
from worker.engines import INTO, Engine, server_sets
from worker.engines.pg_connection import conn_params
from worker.procedures.restore import RestoreResult, Restores
from worker.progress import Progress

BESIDE = ("postgresql", "mysql")  # servers whose restore can go into another database


class ScopedRestores(Restores):
    async def restore_as_asked(self, job: Job, target: TargetConfig, engine: Engine,
                               progress: Progress, identities: Sequence[AgeKey] = ()
                               ) -> RestoreResult:
        """The restore the job asks for: over the live database, or beside it."""
        if job.params.get("into_database"):
            return await self.restore_beside(job, target, engine, progress, identities)
        return await self.restore(job, target, engine, progress, identities)

    async def beside_checks(self, job: Job, target: TargetConfig, engine: Engine) -> bool:
        """What a restore into a database beside the live one (PostgreSQL, MySQL) refuses
        before it loads anything — and a restore to a point in time before it recovers
        anything: a server target, the target's own, a system or a drill's database, one
        that exists without `replace`, a role that may not create one. Whether it
        exists."""
        name = str(job.params.get("into_database"))
        if target.engine not in BESIDE or target.databases:
            kind = "a server target" if target.databases else target.engine
            raise RestoreFailed(f"into_database is not available for target '{target.id}' "
                                f"({kind})", database_unchanged=True, code="invalid_body")
        sets = cast(server_sets.SetEngine, engine)
        if name == live_database(target) or server_sets.refused(
                dataclasses.replace(target, databases=("*",)), target.engine, name):
            raise RestoreFailed(f"database {name!r} cannot be restored into (the target's own "
                                "database, a system database or a drill's)",
                                database_unchanged=True, code="database_refused")
        exists = name in await sets.server_databases(target)
        if exists and not job.params.get("replace"):
            raise RestoreFailed(f"database {name!r} already exists on the server of target "
                                f"'{target.id}': nothing was changed (\"replace\": true "
                                "restores over it, its safety backup first)",
                                database_unchanged=True, code="database_exists")
        refusal = getattr(engine, "cannot_create_database", None)
        if not exists and refusal is not None and (why := await refusal(target)):
            raise RestoreFailed(f"cannot create database {name}: {why}; nothing was changed",
                                database_unchanged=True, code="restore_failed")
        return exists

    async def restore_beside(self, job: Job, target: TargetConfig, engine: Engine,
                             progress: Progress, identities: Sequence[AgeKey] = ()
                             ) -> RestoreResult:
        name = str(job.params.get("into_database"))
        if target.engine == "sqlite":
            return await self._beside_file(job, target, engine, progress, identities, name)
        if target.engine == "mongodb":
            return await self._beside_mongo(job, target, engine, progress, identities, name)
        if target.engine == "redis":
            return await self._beside_redis(job, target, engine, progress, identities, name)
        exists = await self.beside_checks(job, target, engine)
        sets = cast(server_sets.SetEngine, engine)
        beside = server_sets.member_target(target, name)
        beside = dataclasses.replace(beside, databases=(), globals=target.globals)
        if exists:
            result = await self.restore(job, beside, engine, progress, identities)
            result["warnings"] = [f"restored into database {name} (replaced), beside the "
                                  "live database", *(result["warnings"] or [])]
            return result
        manifest = await self.catalog.manifest(target.id, naming.parse(
            str(job.params.get("backup", ""))))
        facts = {**manifest, "database": name}
        if not await sets.create_database(target, name, facts, progress):
            # there after all (a database our listing leaves out, another letter case, or
            # one made a moment ago): never loaded into, never dropped by this restore
            raise RestoreFailed(f"database {name!r} already exists on the server of target "
                                f"'{target.id}': nothing was changed", database_unchanged=True,
                                code="database_exists")
        try:
            params = job.params.copy()
            params["create_safety_backup"] = False  # nothing was there to keep
            if tables := job.params.get("tables") or ():  # only these: their schemas first
                if make := getattr(engine, "make_schemas", None):
                    await make(beside, sorted({t.split(".", 1)[0] for t in tables}), facts)
            result = await self.restore(dataclasses.replace(job, params=params), beside,
                                        engine, progress, identities)
            await sets.database_restored(target, name, facts)
            if quiet := getattr(sets, "quiet_copy", None):  # a copy does not act on its own
                result["warnings"] = [*(result["warnings"] or []),
                                      *await quiet(target, name)]
        except BaseException as failure:
            try:
                await sets.drop_database(target, name)
            except Exception as exc:  # noqa: BLE001 - said, never hidden
                progress.warn(f"database {name}, created by this failed restore, could not "
                              f"be dropped ({type(exc).__name__}: {exc})")
                if isinstance(failure, SafeholdError):  # the restore's own failure first
                    failure.details = {**(getattr(failure, "details", None) or {}),
                                       "leftover_database": name}
                    failure.message += (f"; the database {name} it created could not be "
                                        f"dropped ({type(exc).__name__}): drop it by hand")
                raise failure from exc
            progress.warn(f"dropped database {name}, which this failed restore created")
            if isinstance(failure, SafeholdError):  # the server is as it was
                told = RestoreFailed(f"{failure.message}; the database {name} it created was "
                                     "dropped again, the live database was never touched",
                                     database_unchanged=True, code=failure.code)
                told.details = {**(getattr(failure, "details", None) or {}),
                                "database_state": "unchanged"}
                raise told from None
            raise
        result["warnings"] = [f"restored into the new database {name}, beside the live "
                              "database (untouched)", *(result["warnings"] or [])]
        return result


    async def _beside_mongo(self, job: Job, target: TargetConfig, engine: Engine,
                            progress: Progress, identities: Sequence[AgeKey], name: str
                            ) -> RestoreResult:
        """MongoDB: the backup's one database loaded under a new name; a failure drops
        what was made. A database that exists is refused unless `replace`: then it is
        restored over like a live one (its safety backup first, rolled back on failure)."""
        manifest = await self.catalog.manifest(target.id, naming.parse(
            str(job.params.get("backup", ""))))
        held = manifest.get("databases")
        if not isinstance(held, list) or len(held) != 1 or not isinstance(held[0], str):
            raise RestoreFailed("into_database takes a MongoDB backup of one database (this "
                                f"one holds {held})", database_unchanged=True,
                                code="invalid_body")
        if name in held or name in ("admin", "local", "config"):
            raise RestoreFailed(f"database {name!r} cannot be restored into (the backup's "
                                "own database or a system one)", database_unchanged=True,
                                code="database_refused")
        mongo = cast(Any, engine)
        exists = await mongo.database_exists(target, name)
        if exists and not job.params.get("replace"):
            raise RestoreFailed(f"database {name!r} already exists on the server of target "
                                f"'{target.id}': nothing was changed (\"replace\": true "
                                "restores over it, its safety backup first)",
                                database_unchanged=True, code="database_exists")
        # the copy's own target: its safety backup and a rollback's reach are that
        # database only
        beside = dataclasses.replace(target, url=_with_path(target.url, name))
        params = job.params.copy()
        if not exists:
            params["create_safety_backup"] = False  # nothing was there to keep
        async def undo() -> str:
            await mongo.drop_database(target, name)
            return f"the database {name} it created was dropped again"
        result = await self._into(job, params, beside, engine, progress, identities,
                                  {held[0]: name}, None if exists else undo)
        result["warnings"] = [f"restored {held[0]} into "
                              + (f"database {name} (replaced)" if exists else
                                 f"the new database {name}")
                              + ", beside the live one (untouched)", *(result["warnings"] or [])]
        return result

    async def _beside_redis(self, job: Job, target: TargetConfig, engine: Engine,
                            progress: Progress, identities: Sequence[AgeKey], name: str
                            ) -> RestoreResult:
        """Redis: the backup's one database index loaded into another index of the same
        server (each SELECT rewritten). An index that holds keys is refused unless
        `replace`: then it is restored over like a live one (its safety backup first); a
        failure into an empty index empties it again."""
        from redis.exceptions import RedisError

        from worker.engines.redis import RedisEngine, url_db

        manifest = await self.catalog.manifest(target.id, naming.parse(
            str(job.params.get("backup", ""))))
        held = manifest.get("databases")
        if not isinstance(held, list) or len(held) != 1 or not str(held[0]).isdigit():
            raise RestoreFailed("into_database takes a Redis backup of one database index "
                                f"(this one holds {held})", database_unchanged=True,
                                code="invalid_body")
        into, source = int(name), int(str(held[0]))
        taken = {source, url_db(target)} | {
            url_db(t) for t in self.settings.targets.values()
            if t.engine == "redis" and t.id != target.id and _server(t) == _server(target)}
        if not name.isdigit() or into in taken:
            raise RestoreFailed(f"database {name} cannot be restored into (the backup's own "
                                "database index, or one a target backs up)",
                                database_unchanged=True, code="database_refused")
        redis = cast(RedisEngine, engine)
        try:
            exists = await redis.keys_in(target, into) > 0
        except RedisError as exc:
            raise RestoreFailed(f"database index {into} cannot be used on the server of "
                                f"target '{target.id}' ({exc})", database_unchanged=True,
                                code="database_refused") from None
        if exists and not job.params.get("replace"):
            raise RestoreFailed(f"database {into} on the server of target '{target.id}' "
                                "holds keys: nothing was changed (\"replace\": true restores "
                                "over it, its safety backup first)", database_unchanged=True,
                                code="database_exists")
        beside = dataclasses.replace(target, url=_with_path(target.url, str(into)))
        params = job.params.copy()
        if not exists:
            params["create_safety_backup"] = False  # nothing was there to keep
        async def undo() -> str:
            async with redis.connect(target, into) as r:  # it was empty
                await r.flushdb()
            return f"database {into}, empty before, was emptied again"
        result = await self._into(job, params, beside, engine, progress, identities,
                                  {str(source): str(into)}, None if exists else undo)
        result["warnings"] = [f"restored database {source} into database {into}"
                              + (" (replaced)" if exists else "")
                              + ", beside the live one (untouched)",
                              *(result["warnings"] or [])]
        return result

    async def _into(self, job: Job, params: JobParams, beside: TargetConfig, engine: Engine,
                    progress: Progress, identities: Sequence[AgeKey], into: dict[str, str],
                    undo: Callable[[], Awaitable[str]] | None) -> RestoreResult:
        """The restore with the backup's databases written elsewhere (INTO); a failure
        into a new one runs `undo` (which says what it did): the server is as it was."""
        token = INTO.set(into)
        try:
            return await self.restore(dataclasses.replace(job, params=params), beside,
                                      engine, progress, identities)
        except BaseException as failure:
            if undo is None:  # restored over: the restore said what state it is in
                raise
            done = await undo()
            progress.warn(f"{done}: this restore failed")
            if isinstance(failure, SafeholdError):
                told = RestoreFailed(f"{failure.message}; {done}, the live database was "
                                     "never touched", database_unchanged=True,
                                     code=failure.code)
                told.details = {"database_state": "unchanged"}
                raise told from None
            raise
        finally:
            INTO.reset(token)

    async def _beside_file(self, job: Job, target: TargetConfig, engine: Engine,
                           progress: Progress, identities: Sequence[AgeKey], name: str
                           ) -> RestoreResult:
        """SQLite: a new file next to the target's, with its mode and owner (the restore
        writes it whole, then renames it in: a failure leaves no file)."""
        live = Path(target.path)
        # the directory the API checked too
        path = await asyncio.to_thread(lambda: live.resolve().parent / name)
        if "/" in name or name in (".", "..") or await asyncio.to_thread(
                _taken, path, [Path(t.path) for t in self.settings.targets.values()
                               if t.engine == "sqlite"]):
            raise RestoreFailed(f"{name!r} is not a file name beside the target's database "
                                "(it is, or is linked to, a target's database file)",
                                database_unchanged=True, code="database_refused")
        beside = dataclasses.replace(target, path=str(path))
        exists = await asyncio.to_thread(path.exists)
        if exists and not job.params.get("replace"):
            raise RestoreFailed(f"{path.name} already exists beside target '{target.id}''s "
                                "database: nothing was changed (\"replace\": true restores "
                                "over it, its safety backup first)", database_unchanged=True,
                                code="database_exists")
        params = job.params.copy()
        if not exists:
            params["create_safety_backup"] = False  # nothing was there to keep
        result = await self.restore(dataclasses.replace(job, params=params), beside, engine,
                                    progress, identities)
        if not exists:
            await asyncio.to_thread(_same_mode, live, path)
        result["warnings"] = [f"restored into {path.name}, beside the live database file "
                              "(untouched)", *(result["warnings"] or [])]
        return result


def _taken(path: Path, databases: list[Path]) -> bool:
    """`path` is (or links to, or on a case-insensitive file system names) a configured
    SQLite target's database file or one of its -wal/-shm/-journal companions."""
    if path.is_symlink():
        return True
    for db in databases:
        for f in (db, *(Path(f"{db}{x}") for x in ("-wal", "-shm", "-journal"))):
            if path.resolve() == f.resolve() or (
                    path.exists() and f.exists() and os.path.samefile(path, f)):
                return True
    return False


def _same_mode(live: Path, copy: Path) -> None:
    """The copy gets the live file's mode and, where allowed, its owner."""
    if not live.exists():
        return
    st = live.stat()
    os.chmod(copy, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(PermissionError):
        os.chown(copy, st.st_uid, st.st_gid)


def _with_path(url: str, path: str) -> str:
    """`url` naming another database (its path)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, "/" + quote(path, safe=""), u.query, u.fragment))


def _server(target: TargetConfig) -> tuple[str, int | None]:
    from urllib.parse import urlsplit

    u = urlsplit(target.url)
    return (u.hostname or "127.0.0.1").lower(), u.port


def live_database(target: TargetConfig) -> str:
    """The database a one-database target's URL names."""
    if target.engine == "postgresql":
        return conn_params(target)["database"]
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(target.url).path.lstrip("/"))
