"""A MySQL/MariaDB target's database as it was at an instant (issue 26), made into a regular
backup that the ordinary restore then loads (worker/procedures/pitr.py).

The newest base (a regular backup recording its binlog position) consistent by then is
verified and loaded into a scratch server of the worker's own (worker/engines/my_scratch.py);
the archived binlog from the base's file on is read back (every object's stored and plain
sha256 checked), staged as the server's files, decoded by the stock `mariadb-binlog`
(`--database`: the target's only; `--start-position`: the base's; `--stop-datetime`: the
second after the instant, so every event of that second is in — binlog stamps are whole
seconds), every statement and row event checked (shared/formats/binlogsql.py), and replayed
by the stock client with the restore's guard flags. The database is then dumped from the
scratch server. The target's server is not touched until the ordinary restore."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from shared import naming, rcmd
from shared.binlog_window import BinlogRecovery, choose, said_of
from shared.codecs.base import AgeKey
from shared.config import Secret, TargetConfig
from shared.errors import PipelineError, RestoreFailed
from shared.formats.binlog import (
    BINLOG_AT,
    ROTATE,
    STOP,
    EventReader,
    file_parts,
    gtid_stop,
    parse_gtids,
    position,
    position_text,
)
from shared.formats.binlogsql import BinlogSqlCheck
from shared.jobs import Job, Phase
from shared.scratch import work_dir
from worker.archive_read import ArchiveReader, when_of
from worker.engines import Engine, RestoreOptions, my_pitr
from worker.engines.my_connection import (
    client_guard_flags,
    conn_params,
    connect,
    defaults_file,
    find_tool,
    query,
    text_of,
)
from worker.engines.my_connection import quote as my_quote
from worker.engines.my_scratch import scratch_server
from worker.procedures.restore import Restores
from worker.progress import Progress
from worker.subproc import spawn


@dataclasses.dataclass(frozen=True)
class BinlogPointBackup:
    filename: str
    sha256: str
    base: str  # the base backup's file name
    at: datetime | None  # None: the archive's end
    events_to: str  # the binlog position replayed up to (the archive's end, or T's)
    warnings: tuple[str, ...] = ()


class BinlogPitr(Restores):
    async def binlog_point_backup(self, job: Job, target: TargetConfig, engine: Engine,
                                  progress: Progress, asked: str,
                                  identities: Sequence[AgeKey], note: str
                                  ) -> BinlogPointBackup:
        archive = target.id + naming.PITR_SUFFIX
        stop = None
        if m := BINLOG_AT.fullmatch(asked):  # a binlog position: up to the event there
            if not 4 <= int(m[3]) < 1 << 32:
                raise RestoreFailed(f"{asked}: no such binlog position; nothing was changed",
                                    database_unchanged=True, code="outside_window")
            stop = position(int(m[2]), int(m[3]))
        gtid = None
        if asked.startswith("gtid:"):  # a MariaDB GTID: through that transaction
            one = parse_gtids(asked[5:])
            if one is None or len(one) != 1:
                raise RestoreFailed(f"{asked[:80]}: not one GTID (gtid:domain-server-seq); "
                                    "nothing was changed", database_unchanged=True,
                                    code="outside_window")
            [(domain, (server, seq))] = one.items()
            gtid = (domain, server, seq)
        state = await rcmd.hgetall_text(self.store.redis,
                                        self.store.keys.pitr(target.id, "state"))
        plan = choose(await self.catalog.list_backups(archive),
                      await self.catalog.list_backups(target.id),
                      None if asked in ("latest", "random") or stop is not None
                      or gtid is not None else when_of(asked), target.id,
                      random_point=asked == "random", stop=stop, gtid=gtid,
                      said=said_of(state))
        if m and m[1] != plan.basename:
            raise RestoreFailed(f"{asked}: the target's binlog files are {plan.basename}.*; "
                                "nothing was changed", database_unchanged=True,
                                code="outside_window")
        ids = list(identities) + self.identities(target)
        progress.set_phase(Phase.RECOVERING)
        async with work_dir("binlog-pitr") as work:
            staged = work / "binlog"
            await asyncio.to_thread(staged.mkdir)
            files = await self._stage(plan, ArchiveReader(self.catalog, archive, ids), staged)
            if plan.gtid is not None:  # where that transaction ends, from the bytes
                files, plan = await asyncio.to_thread(_through_gtid, files, plan, asked)
            db = conn_params(target)["database"]
            async with scratch_server() as url:
                scratch = dataclasses.replace(
                    target, password=None, pitr=None, globals=False,
                    url=url.replace("{database}", quote(db, safe="")))
                await self._load_base(job, target, scratch, engine, plan, progress, ids, db)
                until = None if plan.at is None else (
                    plan.at.replace(microsecond=0) + timedelta(seconds=1))
                replayer, dumper = await self._lock_down(scratch, db)
                check = await self._replay(replayer, plan, files, until, db, progress)
                progress.log(f"replayed {check.statements} statements and {check.row_events} "
                             f"row events of the binlog after {plan.base.filename}")
                said = [f"left out of the replay {len(check.skipped)} statement(s) about "
                        "other databases only (a point-in-time restore replays the target's "
                        "database): " + "; ".join(check.skipped[:5])[:600]
                        ] if check.skipped else []
                for line in said:
                    progress.warn(line)
                made = await self.backup(
                    job, dumper, engine, progress, kind="backup", compress=True,
                    note=f"{note} {plan.at.isoformat() if plan.at else asked}: base "
                         f"{plan.base.filename}, binlog from "
                         f"{position_text(plan.base.position)}")
        end = plan.stop if plan.stop is not None else max(
            (p.end for p in plan.pieces), default=plan.base.position)
        return BinlogPointBackup(made["filename"], made["sha256"], plan.base.filename,
                                 plan.at, position_text(end), tuple(said))

    async def _stage(self, plan: BinlogRecovery, reader: ArchiveReader, staged: Path
                     ) -> list[Path]:
        """The binlog files from the base's on, as the server wrote them, from the
        archive (each object checked); a hole in them stops the recovery (nothing was
        changed)."""
        numbers = sorted({p.number for p in plan.pieces})
        files = []
        for number in numbers:
            path = staged / my_pitr.file_name(plan.basename, number)
            have = 0
            out = await asyncio.to_thread(open, path, "wb")
            try:
                for piece in sorted((p for p in plan.pieces if p.number == number),
                                    key=lambda p: (p.start, -p.end)):
                    if piece.hi <= have:
                        continue  # within what a whole file already gave
                    if piece.lo != have:
                        raise RestoreFailed(f"binlog file {number} is archived from byte "
                                            f"{piece.lo} but only {have} bytes precede it; "
                                            "nothing was changed", database_unchanged=True,
                                            code="archive_damaged")

                    async def write(chunks: AsyncIterator[bytes], f: BinaryIO = out) -> None:
                        async for chunk in chunks:
                            await asyncio.to_thread(f.write, chunk)

                    async def rewind(f: BinaryIO = out, at: int = have) -> None:
                        await asyncio.to_thread(f.seek, at)
                        await asyncio.to_thread(f.truncate)
                    await reader.read(piece.filename, write, rewind)
                    have = out.tell()
            finally:
                await asyncio.to_thread(out.close)
            files.append(path)
        for i, path in enumerate(files):  # what the manifests claimed, proved by the bytes
            later = [p for p in plan.pieces if p.number == numbers[i] + 1 and p.lo == 0]
            joined = any(p.joins is not None and p.joins & 0xFFFFFFFF == path.stat().st_size
                         for p in later)
            await asyncio.to_thread(_check_staged, path, i == len(files) - 1, joined)
        return files

    async def _load_base(self, job: Job, target: TargetConfig, scratch: TargetConfig,
                         engine: Engine, plan: BinlogRecovery, progress: Progress,
                         ids: Sequence[AgeKey], db: str) -> None:
        """The base backup, verified, loaded into the scratch server's new database."""
        name = naming.parse(plan.base.filename)
        copies = await self.catalog.copies(target.id, name)
        checked = await self._verify(target, engine, name, copies, progress, ids)
        loading = checked.load_manifest()
        server = dataclasses.replace(scratch, url=scratch.url.replace(
            f"/{quote(db, safe='')}?", "/?"))
        await engine.create_database(server, db, loading, progress)  # type: ignore[attr-defined]
        async with self._plain(checked.store, target, name, loading, ids,
                               checked.windows) as chunks:
            await engine.restore(scratch, chunks, progress, clean=True, manifest=loading,
                                 options=RestoreOptions(scratch=True))

    @staticmethod
    async def _lock_down(scratch: TargetConfig, db: str) -> tuple[TargetConfig, TargetConfig]:
        """After the base's load, before the replay: the accounts of the scratch server as
        the binlog may meet them. The replay account (a random name: nothing in a base can
        name it as a DEFINER) holds every right on the target's database and BINLOG
        REPLAY, nothing else — no global setting, no file, no plugin, no other database,
        whatever a statement the check let pass turns out to do. root@localhost keeps its
        rights on the target's database only: a view, trigger or routine of the base with
        that DEFINER still works, but no longer sets a global, writes a file or replays
        binlog events as a superuser (an attack review made one that did); every other
        account and role goes (a DEFINER naming one fails). A new admin, of a random name,
        dumps the result. Returns the (replay, admin) targets."""
        replay, admin = (f"safehold_replay_{secrets.token_hex(6)}",
                         f"safehold_admin_{secrets.token_hex(6)}")
        replay_pw, admin_pw = secrets.token_hex(24), secrets.token_hex(24)
        async with connect(scratch) as conn:
            await query(conn, f"CREATE USER '{admin}'@'localhost' IDENTIFIED BY %s", admin_pw)
            await query(conn, f"GRANT ALL PRIVILEGES ON *.* TO '{admin}'@'localhost' "
                              "WITH GRANT OPTION")
        dumper = dataclasses.replace(scratch, url=scratch.url.replace(
            "//root@", f"//{admin}@", 1), password=Secret(admin_pw))
        async with connect(dumper) as conn:  # (root cannot take its own rights and go on)
            await query(conn, f"CREATE USER '{replay}'@'localhost' IDENTIFIED BY %s", replay_pw)
            await query(conn, f"GRANT ALL PRIVILEGES ON {my_quote(db)}.* TO "
                              f"'{replay}'@'localhost'")
            await query(conn, f"GRANT BINLOG REPLAY ON *.* TO '{replay}'@'localhost'")
            accounts = await query(conn, "SELECT User, Host, is_role FROM mysql.user")
            for user, host, is_role in accounts:
                name, where = text_of(user), text_of(host)
                # (mariadb.sys owns the mysql.user view; it logs in nowhere)
                if name in (admin, replay, "PUBLIC", "mariadb.sys"):
                    continue
                if text_of(is_role) == "Y":
                    await query(conn, f"DROP ROLE {my_quote(name)}")
                elif (name, where) != ("root", "localhost"):
                    # (root at other hosts too: the scratch server has no network)
                    await query(conn, f"DROP USER {my_quote(name)}@{my_quote(where)}")
                else:
                    await query(conn, "REVOKE ALL PRIVILEGES, GRANT OPTION FROM root@localhost")
                    await query(conn, f"GRANT ALL PRIVILEGES ON {my_quote(db)}.* TO "
                                      "root@localhost")
        replayer = dataclasses.replace(scratch, url=scratch.url.replace(
            "//root@", f"//{replay}@", 1), password=Secret(replay_pw))
        return replayer, dumper

    async def _replay(self, scratch: TargetConfig, plan: BinlogRecovery, files: list[Path],
                      stop: datetime | None, db: str, progress: Progress) -> BinlogSqlCheck:
        """Decode → check → the client, on the scratch server."""
        check = BinlogSqlCheck(db)
        if not files:
            return check
        decoder = find_tool("mariadb-binlog", "mysqlbinlog")
        client = find_tool("mariadb", "mysql")
        argv = [decoder, "--no-defaults", f"--database={db}",
                f"--start-position={plan.base.position & 0xFFFFFFFF}"]
        if stop is not None:
            argv.append(f"--stop-datetime={stop.strftime('%Y-%m-%d %H:%M:%S')}")
        if plan.stop is not None:  # (the last file given is the stop's)
            argv.append(f"--stop-position={plan.stop & 0xFFFFFFFF}")
        argv += ["--", *map(str, files)]
        with defaults_file(scratch) as cnf:
            replay = [client, f"--defaults-file={cnf}", *await client_guard_flags(client),
                      "--", db]
            async with spawn(argv, env={"TZ": "UTC"}, stdout=True) as decoding, \
                    spawn(replay, env={}, stdin=True) as applying:
                stdin = applying.proc.stdin
                assert stdin is not None
                try:
                    while data := await decoding.read():
                        if out := check.feed(data):
                            stdin.write(out)
                            await stdin.drain()
                        progress.add_bytes(len(data))
                    if out := check.finish():
                        stdin.write(out)
                    stdin.close()
                except (BrokenPipeError, ConnectionResetError):
                    decoding.proc.kill()  # the client stopped (its exit code says why):
                    # the decoder, blocked on a full pipe, would wait for ever
                except BaseException:
                    applying.proc.kill()  # never commit what follows a refusal
                    raise
                if (rc := await decoding.wait()) != 0:
                    raise RestoreFailed(f"mariadb-binlog exited with code {rc}: "
                                        f"{decoding.error_text()}", database_unchanged=True,
                                        code="pitr_replay_failed")
                if (rc := await applying.wait()) != 0:
                    raise RestoreFailed(f"replaying the binlog failed (the client exited with "
                                        f"code {rc}): {applying.error_text()}",
                                        database_unchanged=True, code="pitr_replay_failed")
        return check


def _check_staged(path: Path, last: bool, joined: bool) -> None:
    """A staged binlog file is what its manifests said: events one after the other from
    the magic on, each ending where its header says; a file the replay goes past ends
    with its rotate or stop event (or, where the server moved on after a crash, where the
    next file's first piece says it ended). Else the archive lies: nothing was changed."""
    reader = EventReader()
    end, kind = 4, None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                events = reader.feed(chunk)
            except PipelineError as exc:
                raise RestoreFailed(f"{path.name} as archived is not a binlog ({exc.message});"
                                    " nothing was changed", database_unchanged=True,
                                    code="archive_damaged") from None
            for ev in events:
                if ev.start != end:
                    raise RestoreFailed(f"{path.name} as archived has an event at byte "
                                        f"{end} saying it starts at {ev.start}; nothing was "
                                        "changed", database_unchanged=True,
                                        code="archive_damaged")
                end, kind = ev.log_pos, ev.type
    if reader.pending or (not last and kind not in (ROTATE, STOP) and not joined):
        raise RestoreFailed(f"{path.name} as archived ends inside an event, or before its "
                            "rotate event; nothing was changed", database_unchanged=True,
                            code="archive_damaged")


def _through_gtid(files: list[Path], plan: BinlogRecovery, asked: str
                  ) -> tuple[list[Path], BinlogRecovery]:
    """The staged files up to the one holding the GTID's transaction, and the plan
    stopping right after its commit (the decoder's --stop-position on that file)."""
    assert plan.gtid is not None
    found = gtid_stop(files, plan.base.position & 0xFFFFFFFF, plan.gtid)
    if isinstance(found, str):
        raise RestoreFailed(f"{asked}: {found} (after base {plan.base.filename}); nothing "
                            "was changed", database_unchanged=True, code="outside_window")
    index, offset = found
    parts = file_parts(files[index].name)
    assert parts is not None
    return files[:index + 1], dataclasses.replace(plan, stop=position(parts[1], offset))
