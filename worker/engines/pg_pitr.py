"""PostgreSQL's side of point-in-time recovery: what the archive needs of the server
(a role with REPLICATION, a `replication` line in pg_hba.conf, `wal_level = replica`), the
physical replication slot that keeps WAL until it is archived, and the stock
`pg_receivewal` that streams it.

The slot is Safehold's, advanced only to what every destination holds (never by
pg_receivewal, which streams without it): a worker killed with WAL on its local disk that
no destination has yet costs nothing, since the next streamer asks the server for it
again. pg_receivewal starts at the segment of its spool's newest file, so a streamer
resumes by seeding an empty (zero-filled) `<segment>.partial` — the server streams that
segment again from its start, and bytes already archived are not shipped twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from shared.config import TargetConfig
from shared.errors import EngineError
from shared.pitr_window import lsn_int, lsn_text, segment_name, segment_start
from worker.engines.pg_connection import conn_params, connect, tool_env
from worker.subproc import Child, as_user, feed_stdin, spawn

__all__ = ["lsn_int", "lsn_text", "segment_name", "segment_start"]
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}\Z")  # a completed segment in the spool


@dataclass(frozen=True)
class ServerFacts:
    """What the archive records of the server it streams (a restore from elsewhere, or a
    new timeline, shows as a gap)."""

    system_id: str
    timeline: int
    seg_bytes: int
    major: int
    user: str


def _pg_hba_line(target: TargetConfig, client: str) -> str:
    c = conn_params(target)
    method = "scram-sha-256" if target.password is not None else "trust"
    return f"host replication {c['user']} {client}/32 {method}"


async def bindir(target: TargetConfig) -> Path:
    """Where the stock tools of the server's major version are (pg_bindir, else
    `pg_config --bindir`, else Debian's /usr/lib/postgresql/<major>/bin)."""
    assert target.pitr is not None
    if target.pitr.pg_bindir:
        return Path(target.pitr.pg_bindir)
    async with connect(target) as conn:
        major = int(str(await conn.fetchval("SHOW server_version_num"))) // 10000
    return await tools_of(major, f"targets.{target.id}.pitr.pg_bindir")


async def tools_of(major: int, setting: str) -> Path:
    """The stock tools of PostgreSQL `major` (Debian's layout, else `pg_config`)."""
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "pg_receivewal").exists():
        return debian
    found = shutil.which("pg_config")
    if found:
        proc = await asyncio.create_subprocess_exec(
            found, "--bindir", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        if (Path(out.decode().strip()) / "pg_receivewal").exists():
            return Path(out.decode().strip())
    raise EngineError(f"pg_receivewal of PostgreSQL {major} is not installed (the server's "
                      f"major version): install postgresql-{major} or set {setting}",
                      code="tool_missing")


async def preflight(target: TargetConfig) -> ServerFacts:
    """Check what streaming needs of the server, naming the exact fix for what is missing:
    the role's REPLICATION, `wal_level`, a wal sender free, a pg_hba.conf replication
    line (tried with a replication connection, as pg_receivewal will)."""
    async with connect(target) as conn:
        user = str(await conn.fetchval("SELECT current_user"))
        may = await conn.fetchval(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")
        if not may:
            raise EngineError(
                f"role {user} may not stream WAL: run ALTER ROLE \"{user}\" REPLICATION; "
                "as a superuser", code="pitr_not_allowed")
        wal_level = str(await conn.fetchval("SHOW wal_level"))
        if wal_level not in ("replica", "logical"):
            raise EngineError(f"the server's wal_level is {wal_level}: set wal_level = "
                              "replica in postgresql.conf and restart PostgreSQL",
                              code="pitr_not_allowed")
        if int(str(await conn.fetchval("SHOW max_wal_senders"))) < 1:
            raise EngineError("the server's max_wal_senders is 0: set max_wal_senders = 10 "
                              "in postgresql.conf and restart PostgreSQL",
                              code="pitr_not_allowed")
        seg_bytes = int(str(await conn.fetchval(
            "SELECT setting::bigint * CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 "
            "WHEN 'MB' THEN 1048576 ELSE 1 END FROM pg_settings "
            "WHERE name = 'wal_segment_size'")))
        major = int(str(await conn.fetchval("SHOW server_version_num"))) // 10000
        client = str(await conn.fetchval("SELECT host(inet_client_addr())") or "127.0.0.1")
    tools = await bindir(target)
    ident = await replication_command(target, tools, "IDENTIFY_SYSTEM", client)
    parts = ident.split("|")
    if len(parts) < 3 or not parts[1].isdigit():
        raise EngineError(f"IDENTIFY_SYSTEM answered {ident[:100]!r}", code="pitr_failed")
    return ServerFacts(system_id=parts[0], timeline=int(parts[1]), seg_bytes=seg_bytes,
                       major=major, user=user)


async def replication_command(target: TargetConfig, tools: Path, command: str,
                              client: str = "127.0.0.1") -> str:
    """One command on a replication connection (psql, `replication=true`)."""
    c = conn_params(target)
    env = {**tool_env(target), "PGDATABASE": "replication", "PGAPPNAME": "safehold_pitr"}
    argv = [str(tools / "psql"), "-X", "-A", "-t", "-c", command,
            f"host={c['host']} port={c['port']} user={c['user']} replication=true"]
    async with spawn(argv, env=env, secrets=target.secrets(), stdout=True) as child:
        out = b""
        while chunk := await child.read():
            out += chunk
        rc = await child.wait()
    if rc != 0:
        why = child.error_text()
        if "pg_hba.conf" in why:
            raise EngineError(
                f"the server refuses replication connections from Safehold: add the line "
                f"`{_pg_hba_line(target, client)}` to pg_hba.conf and reload PostgreSQL "
                f"(SELECT pg_reload_conf()); it said: {why}", code="pitr_not_allowed")
        raise EngineError(f"a replication connection failed: {why}", code="pitr_failed")
    return out.decode().strip()


async def ensure_slot(conn: asyncpg.Connection, slot: str) -> tuple[bool, int | None]:
    """The physical slot (created reserving WAL from now when missing): (created,
    restart LSN)."""
    row = await conn.fetchrow("SELECT slot_type, restart_lsn::text FROM pg_replication_slots "
                              "WHERE slot_name = $1", slot)
    if row is not None:
        if row["slot_type"] != "physical":
            raise EngineError(f"replication slot {slot} exists and is {row['slot_type']}: "
                              "name another in pitr.slot", code="pitr_failed")
        return False, lsn_int(row["restart_lsn"]) if row["restart_lsn"] else None
    await conn.execute("SELECT pg_create_physical_replication_slot($1, true)", slot)
    lsn = await conn.fetchval("SELECT restart_lsn::text FROM pg_replication_slots "
                              "WHERE slot_name = $1", slot)
    return True, lsn_int(lsn) if lsn else None


async def advance_slot(conn: asyncpg.Connection, slot: str, lsn: int) -> None:
    """Let the server recycle WAL before `lsn` (archived on every destination)."""
    await conn.execute("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", slot,
                       lsn_text(lsn))


async def drop_slot(target: TargetConfig, slot: str) -> bool:
    async with connect(target) as conn:
        if await conn.fetchval("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                               slot):
            await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
            return True
    return False


@dataclass(frozen=True)
class Position:
    """The server's WAL and what the receiver holds, read together."""

    server_flush: int
    received: int | None  # pg_receivewal's flushed LSN (None: not streaming)
    slot_restart: int | None
    timeline: int


async def position(conn: asyncpg.Connection, app: str, slot: str) -> Position:
    row = await conn.fetchrow(
        "SELECT pg_current_wal_flush_lsn()::text AS server, "
        "(SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = $1 "
        " ORDER BY backend_start DESC LIMIT 1) AS received, "
        "(SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $2) AS slot, "
        "(SELECT timeline_id FROM pg_control_checkpoint()) AS timeline", app, slot)
    assert row is not None
    return Position(server_flush=lsn_int(row["server"]),
                    received=lsn_int(row["received"]) if row["received"] else None,
                    slot_restart=lsn_int(row["slot"]) if row["slot"] else None,
                    timeline=int(row["timeline"]))


@asynccontextmanager
async def receiving(target: TargetConfig, tools: Path, spool: Path, app: str
                    ) -> AsyncIterator[Child]:
    """pg_receivewal into `spool`, flushing every write (`--synchronous`), ending on a
    lost connection (`--no-loop`: the streamer decides what comes next)."""
    c = conn_params(target)
    argv = [str(tools / "pg_receivewal"), "-D", str(spool), "--synchronous", "--no-loop",
            "-s", "1", "-d",
            f"host={c['host']} port={c['port']} user={c['user']} application_name={app}"]
    async with spawn(argv, env=tool_env(target), secrets=target.secrets()) as child:
        yield child


@dataclass(frozen=True)
class BaseFacts:
    """A base backup as pg_basebackup's own manifest records it (verified)."""

    timeline: int
    start_lsn: int
    end_lsn: int
    files: int


async def _run(argv: list[str], target: TargetConfig, what: str) -> None:
    async with spawn(argv, env=tool_env(target), secrets=target.secrets()) as child:
        rc = await child.wait()
    if rc != 0:
        raise EngineError(f"{what} failed (exit {rc}): {child.error_text()}",
                          code="pitr_base_failed")


async def base_backup(target: TargetConfig, tools: Path, into: Path) -> BaseFacts:
    """A base backup with the stock pg_basebackup into `into` (plain format, the WAL it
    needs included, a SHA-256 manifest), checked with pg_verifybackup before it counts."""
    c = conn_params(target)
    await _run([str(tools / "pg_basebackup"), "-D", str(into), "-F", "p", "-X", "stream",
                "-c", "fast", "--manifest-checksums=SHA256", "-l", "safehold pitr base",
                "-d", f"host={c['host']} port={c['port']} user={c['user']} "
                      "application_name=safehold_base"], target, "pg_basebackup")
    await _run([str(tools / "pg_verifybackup"), str(into)], target, "pg_verifybackup")
    manifest = json.loads((into / "backup_manifest").read_text())
    ranges = manifest.get("WAL-Ranges") or []
    if not ranges:
        raise EngineError("pg_basebackup's manifest names no WAL range",
                          code="pitr_base_failed")
    return BaseFacts(timeline=int(ranges[-1]["Timeline"]),
                     start_lsn=lsn_int(ranges[0]["Start-LSN"]),
                     end_lsn=lsn_int(ranges[-1]["End-LSN"]),
                     files=len(manifest.get("Files") or []))


@asynccontextmanager
async def tar_stream(directory: Path) -> AsyncIterator[Child]:
    """`directory` as a tar stream (stock tar: `tar -x` puts it back)."""
    async with spawn(["tar", "-C", str(directory), "-cf", "-", "."], env={},
                     stdout=True) as child:
        yield child


# ---------------------------------------------------------------------- recovery
_COMMIT = re.compile(r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


async def last_commit(tools: Path, segments: list[Path]) -> datetime | None:
    """The newest commit time in staged WAL (pg_waldump, newest segment first): a target
    time after it is reached by replaying everything (PostgreSQL refuses a target it
    never passes)."""
    for seg in sorted(segments, reverse=True):
        async with spawn([str(tools / "pg_waldump"), str(seg)], env={},
                         stdout=True) as child:
            out = bytearray()
            while chunk := await child.read():
                out += chunk
            await child.wait()
        found = _COMMIT.findall(out.decode("utf-8", "replace"))
        if found:
            return max(datetime.fromisoformat(t).replace(tzinfo=UTC) for t in found)
    return None


def zero_file(path: Path, size: int) -> None:
    """A file of `size` zero bytes (sparse): a WAL segment's shape before its bytes."""
    with open(path, "wb") as f:
        f.truncate(size)


async def untar(chunks: AsyncIterator[bytes], into: Path) -> None:
    """A base backup's tar stream into a data directory (stock tar)."""
    await asyncio.to_thread(into.mkdir, mode=0o700, parents=True, exist_ok=True)
    async with spawn(["tar", "-x", "-C", str(into), "-f", "-"], env={}, stdin=True) as child:
        await feed_stdin(child, b"", chunks, lambda n: None)
        rc = await child.wait()
    if rc != 0:
        raise EngineError(f"the base backup did not unpack: {child.error_text()}",
                          code="pitr_restore_failed")


def _runner() -> tuple[list[str], str | None]:
    """How the scratch server runs unprivileged: as `postgres` when this is root."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return as_user(user), user
        except KeyError:
            continue
    raise EngineError("no unprivileged user to run the scratch PostgreSQL as",
                      code="pitr_restore_failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def recovered(tools: Path, work: Path, data: Path, wal: Path, stop: datetime | None
                    ) -> AsyncIterator[tuple[Path, int]]:
    """A scratch server recovered from the base in `data` and the WAL staged in `wal`, to
    `stop` (inclusive) or to the end of that WAL; loopback-free (a private socket only),
    unprivileged; removed with `work` by the caller. Yields (socket dir, port)."""
    prefix, user = _runner()
    sock = work / "sock"
    await asyncio.to_thread(_prepare, work, data, wal, sock, user)
    port = _free_port()
    opts = [f"port={port}", "listen_addresses=", f"unix_socket_directories={sock}",
            f"restore_command=cp {wal}/%f %p", "recovery_target_action=promote",
            "hba_file=" + str(data / "pg_hba.conf"), "archive_mode=off",
            "max_wal_senders=0", "wal_level=replica", "hot_standby=off",
            "shared_preload_libraries=", "max_connections=20", "fsync=off",
            "logging_collector=off"]
    if stop is not None:
        opts += [f"recovery_target_time={stop.isoformat()}", "recovery_target_inclusive=on"]
    argv = [*prefix, str(tools / "postgres"), "-D", str(data)]
    for o in opts:
        argv += ["-c", o]
    async with spawn(argv, env={}) as server:
        deadline = time.monotonic() + 600
        while True:
            if server.proc.returncode is not None:
                raise EngineError(f"the scratch recovery stopped: {server.error_text(last=6)}",
                                  code="pitr_restore_failed")
            try:
                conn = await asyncpg.connect(host=str(sock), port=port, user="postgres",
                                             database="postgres", timeout=5)
            except (OSError, asyncpg.PostgresError):
                conn = None
            if conn is not None:
                try:
                    if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                        break
                finally:
                    await conn.close()
            if time.monotonic() > deadline:
                raise EngineError("the scratch recovery did not finish in 10 minutes",
                                  code="pitr_restore_failed")
            await asyncio.sleep(0.3)
        yield sock, port


def _prepare(work: Path, data: Path, wal: Path, sock: Path, user: str | None) -> None:
    """The base's data directory made a scratch server's: recovery requested, the live
    server's settings and access rules left out (only a private socket, trust), owned by
    the user it runs as."""
    sock.mkdir(mode=0o700)
    (data / "recovery.signal").write_text("")
    for leftover in ("postmaster.pid", "postmaster.opts", "postgresql.auto.conf",
                     "standby.signal"):
        (data / leftover).unlink(missing_ok=True)
    (data / "postgresql.conf").write_text("# Safehold scratch recovery\n")
    (data / "pg_hba.conf").write_text("local all all trust\n")
    if user is not None:
        for path in (work, data, wal, sock):
            _chown_tree(path, user)


def _chown_tree(path: Path, user: str) -> None:
    for p in [path, *path.rglob("*")]:
        shutil.chown(p, user)
