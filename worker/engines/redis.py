"""Redis: `SCAN` + pipelined `DUMP`/`PTTL` written as RESP `RESTORE` commands.

The backup is a stream of Redis protocol: per logical database a `SELECT n`, then one
`RESTORE key ttl payload REPLACE [ABSTTL]` per key (ABSTTL keeps the original expiry time,
so a key does not live longer because it was restored later). `gunzip -c f | redis-cli
--pipe` replays it with the stock tool. Keys that vanish or expire during the scan are
skipped (SCAN's guarantees: every key present for the whole scan is included once). DUMP
payloads restore on the same or a newer Redis version: the manifest records the server's.

`format=rdb` instead streams the server's RDB snapshot (`redis-cli --rdb -`); restoring an
RDB means replacing the server's dump file while it is stopped, so the API refuses it.

Restore parses the RESP stream and pipelines the RESTOREs in batches; a clean restore first
FLUSHDBs every database the backup contains (and only those). A restore beside the live
database (issue 25, `INTO`) rewrites the backup's one `SELECT n` to another database index.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.config import TargetConfig
from shared.engines import ENGINES
from shared.errors import BadRequest, DumpFailed, RestoreFailed
from shared.formats.redis import RedisScriptCheck
from shared.formats.resp import resp
from shared.formats.respkeys import KeyFilter
from shared.jobs import Phase
from shared.scratch import private_dir
from worker.engines import (
    NO_OPTIONS,
    Drill,
    Dump,
    DumpOptions,
    RestoreOptions,
    dump_errors,
    restore_errors,
    unreachable,
    written,
)
from worker.engines.redis_scan import (
    BIG_PAYLOAD,
    RESTORE,
    RESTORE_ABSTTL,
    ConnectionLost,
    Scan,
    ScanLink,
    framing,
)
from worker.pipeline import SameAsChecked
from worker.progress import Progress
from worker.subproc import spawn

_KEYSPACE = re.compile(r"^db(\d+)$")



def _tls(u: Any) -> ssl.SSLContext | None:
    """TLS for our own connections as redis-py sets it up from the same URL: the chain
    verified (`ssl_cert_reqs`, `ssl_ca_certs`), no hostname check unless asked
    (`ssl_check_hostname`), a client certificate if given (`ssl_certfile`, `ssl_keyfile`)."""
    if u.scheme != "rediss":
        return None
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    ctx = ssl.create_default_context(cafile=q.get("ssl_ca_certs"))
    ctx.check_hostname = q.get("ssl_check_hostname", "").lower() in ("1", "true", "yes")
    if q.get("ssl_cert_reqs", "required").lower() in ("none", "cert_none"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if q.get("ssl_certfile"):
        ctx.load_cert_chain(q["ssl_certfile"], q.get("ssl_keyfile"))
    return ctx


def url_db(target: TargetConfig) -> int | None:
    """The database index a target's URL names (None: every database)."""
    u = urlsplit(target.url)
    path = u.path.strip("/")
    query = parse_qs(u.query).get("db", [""])[-1]  # redis-py lets it win over the path
    return int(query) if query.isdigit() else int(path) if path.isdigit() else None


class RedisEngine:
    name: ClassVar[str] = "redis"
    extension: ClassVar[str] = ENGINES["redis"].extension
    atomic_restore: ClassVar[bool] = False

    @property
    def drill(self) -> RedisDrill:
        return RedisDrill()

    def client(self, target: TargetConfig, db: int | None = None) -> Redis:
        """A client on database `db` (default: the URL's; redis-py would let the URL's
        path win over an explicit one)."""
        u = urlsplit(target.url)
        db = url_db(target) or 0 if db is None else db
        query = "&".join(q for q in u.query.split("&") if q and not q.startswith("db="))
        return Redis.from_url(urlunsplit((u.scheme, u.netloc, "", query, "")), db=db,
                              socket_timeout=60, socket_connect_timeout=10,
                              password=target.password.reveal() if target.password else None)

    @asynccontextmanager
    async def connect(self, target: TargetConfig, db: int | None = None
                      ) -> AsyncIterator[Redis]:
        r = self.client(target, db)
        try:
            await r.ping()
        except (RedisError, OSError) as exc:
            await r.aclose()
            u = urlsplit(target.url)
            raise unreachable(target, "Redis", exc, f"{u.hostname}:{u.port or 6379}") from None
        try:
            yield r
        finally:
            await r.aclose()

    async def _keyspace(self, r: Redis, only: int | None) -> dict[int, dict[str, int]]:
        info = await r.info("keyspace")
        spaces = {}
        for name, values in info.items():
            m = _KEYSPACE.match(name)
            if m and (only is None or int(m[1]) == only):
                spaces[int(m[1])] = values
        if only is not None and only not in spaces:
            spaces[only] = {"keys": 0, "expires": 0}
        return dict(sorted(spaces.items()))

    async def ping(self, target: TargetConfig) -> None:
        async with self.connect(target):
            pass

    async def stats(self, target: TargetConfig) -> dict[str, object]:
        async with self.connect(target) as r:
            server = await r.info("server")
            memory = await r.info("memory")
            spaces = await self._keyspace(r, url_db(target))
        return {
            "engine": self.name,
            "server_version": server.get("redis_version"),
            "used_memory_bytes": memory.get("used_memory"),
            "databases": [{"db": n, "keys": v.get("keys", 0), "expires": v.get("expires", 0)}
                          for n, v in spaces.items()],
            "key_count": sum(v.get("keys", 0) for v in spaces.values()),
        }

    @asynccontextmanager
    async def dump(self, target: TargetConfig, progress: Progress,
                   options: DumpOptions | None = None) -> AsyncIterator[Dump]:
        fmt = (options or {}).get("format") or "resp"
        if fmt == "rdb":
            async with self._dump_rdb(target, progress) as d:
                yield d
            return
        if fmt != "resp":
            raise BadRequest(f"unknown redis backup format {fmt!r} (resp or rdb)")
        async with self.connect(target) as r:
            server = await r.info("server")
            version = server.get("redis_version")
            spaces = await self._keyspace(r, url_db(target))
        progress.item_kind = "keys"
        progress.set_phase(Phase.DUMPING, items_total=sum(v.get("keys", 0)
                                                      for v in spaces.values()))
        counts: dict[str, int] = {}
        major = re.match(r"\d+", str(version or ""))
        scan = Scan(server=str(server.get("run_id") or ""),
                     absolute=major is not None and int(major.group()) >= 7)

        async def chunks() -> AsyncIterator[bytes]:
            for db in spaces:
                yield resp(b"SELECT", str(db).encode())
                counts[f"db{db}"] = 0
                async for block, n in self._dump_db(target, db, scan, progress):
                    counts[f"db{db}"] += n
                    progress.items_done += n
                    yield block

        info = {"server_version": version, "format": "resp", "databases": list(spaces),
                "counts": counts, "count_kind": "keys", "tool": "SCAN+DUMP+PTTL",
                "options": ["RESTORE … REPLACE ABSTTL"]}
        with dump_errors(target, "Redis", RedisError, OSError):
            yield Dump(chunks(), info)

    async def _dump_db(self, target: TargetConfig, db: int, scan: Scan,
                       progress: Progress) -> AsyncIterator[tuple[bytes, int]]:
        """SCAN the database with a server-side script that also DUMPs and PTTLs what each
        step finds (one round trip per ~1000 keys), on a connection of our own: the next
        step is sent the moment a reply's cursor is known, before that reply is written
        out, so the server (whose CPU bounds the backup) never waits for the client.

        A connection lost while a step is in flight (a proxy, an idle timeout, CLIENT
        KILL) is replaced and that step sent again, up to SCAN_RECONNECTS times per backup:
        SCAN's cursor lives in the client and a step's reply is used only once whole, so no
        key is missed or doubled — on the same server process only (its run_id): a cursor
        means nothing to a restarted server or a promoted replica, so that fails the
        backup."""
        link = ScanLink(self, target, db, scan)
        await link.connect()
        try:
            link.step(b"0")
            while True:
                try:
                    got = await link.reply()
                except ConnectionLost as exc:
                    await link.reconnect(exc, progress)
                    continue
                cursor, now_ms = got[0], int(got[1])
                if cursor != b"0":
                    link.step(cursor)
                async for piece in self._records(target, db, scan, got, now_ms):
                    yield piece
                if cursor == b"0":
                    return
        finally:
            await link.close()

    async def _records(self, target: TargetConfig, db: int, scan: Scan, got: list[Any],
                       now_ms: int) -> AsyncIterator[tuple[bytes, int]]:
        """A scan step's keys as RESTORE commands (with their expiry), batched; a big key's
        DUMP is streamed, never held whole."""
        out: list[bytes] = []
        for k, payload, ttl in zip(got[2::3], got[3::3], got[4::3], strict=True):
            if ttl == -2:
                continue  # expired between DUMP and PTTL
            # -1: no expiry; a PTTL of 0 expires this very millisecond (an ABSTTL in the
            # past is not restored)
            expire_at = None if ttl < 0 else ttl if scan.absolute else now_ms + ttl
            if payload == 0:  # a big key: its DUMP streamed, never held whole
                if out:
                    yield b"".join(out), len(out)
                    out = []
                async for piece, n in self._stream_key(target, db, k, expire_at):
                    yield piece, n
                continue
            if len(payload) > BIG_PAYLOAD:  # head, the payload itself, tail
                if out:
                    yield b"".join(out), len(out)
                    out = []
                head, tail = framing(k, len(payload), expire_at)
                yield head, 0
                yield payload, 0
                yield tail, 1
            elif expire_at is not None:
                out.append(RESTORE_ABSTTL % (len(k), k, len(ttl := b"%d" % expire_at),
                                              ttl, len(payload), payload))
            else:
                out.append(RESTORE % (len(k), k, len(payload), payload))
        if out:
            yield b"".join(out), len(out)

    async def _stream_key(self, target: TargetConfig, db: int, key: bytes,
                          expire_at: int | None) -> AsyncIterator[tuple[bytes, int]]:
        """`DUMP key` on a connection of our own, its reply passed on in slices as it
        arrives: a RESTORE command whose payload is never in memory whole. A key gone
        meanwhile (a nil reply) is left out, as the scan leaves out vanished keys."""
        reader, writer = await self._raw(target, db)
        try:
            writer.write(resp(b"DUMP", key))
            header = await asyncio.wait_for(reader.readline(), 60)
            if header.startswith(b"-"):
                raise RedisError(header[1:].decode(errors="replace").strip()[:200])
            if not re.fullmatch(rb"\$(-1|\d{1,12})\r\n", header):
                raise RedisError(f"unexpected DUMP reply {header[:20]!r}")
            size = int(header[1:-2])
            if size < 0:
                return
            head, tail = framing(key, size, expire_at)
            yield head, 0
            left = size
            while left:
                piece = await asyncio.wait_for(reader.read(min(left, BIG_PAYLOAD)), 60)
                if not piece:
                    raise RedisError("Redis closed the connection during a DUMP")
                left -= len(piece)
                yield piece, 0
            try:
                end = await asyncio.wait_for(reader.readexactly(2), 60)
            except asyncio.IncompleteReadError:
                end = b""
            if end != b"\r\n":
                raise RedisError("a DUMP reply without its CRLF")
            yield tail, 1
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    @asynccontextmanager
    async def _dump_rdb(self, target: TargetConfig, progress: Progress) -> AsyncIterator[Dump]:
        u = urlsplit(target.url)
        argv = ["redis-cli", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379)]
        if u.username:
            argv += ["--user", unquote(u.username)]
        if u.scheme == "rediss":
            argv.append("--tls")
        argv += ["--rdb", "-"]
        env = {"REDISCLI_AUTH": target.password.reveal()} if target.password else {}
        async with self.connect(target) as r:
            version = (await r.info("server")).get("redis_version")
        progress.set_phase(Phase.DUMPING)
        async with spawn(argv, env=env, secrets=target.secrets(), stdout=True) as child:
            async def chunks() -> AsyncIterator[bytes]:
                while data := await child.read():
                    yield data

            yield Dump(chunks(), {"server_version": version, "format": "rdb",
                                  "tool": "redis-cli --rdb",
                                  "options": ["--rdb", "-"]})
            rc = await child.wait()
            if rc != 0:
                raise DumpFailed(f"redis-cli --rdb exited with code {rc}: {child.error_text()}")

    async def restore(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress, *, clean: bool, manifest: Mapping[str, object],
                      options: RestoreOptions = NO_OPTIONS) -> None:
        if manifest.get("format") == "rdb":
            raise RestoreFailed(
                "RDB backups are restored by stopping Redis and putting the file in place as "
                "its dump.rdb (see the README); Safehold restores RESP backups",
                database_unchanged=True)
        listed = manifest.get("databases")  # the checked file's (RestorePlan), as strings
        held = {int(str(db)) for db in (listed if isinstance(listed, list) else [])}
        move = {db: int(str(written(db))) for db in held if written(db) != db}
        databases = {int(str(written(db))) for db in held}  # where the backup's keys go
        # the content was checked whole before anything was flushed; it is checked again
        # on its way in unless the stream proves it is those very bytes
        check = None if isinstance(chunks, SameAsChecked) else RedisScriptCheck(held)
        keys = KeyFilter(list(options.keys) or None, move) if options.keys or move else None
        removed = 0
        with restore_errors(target, "Redis", RedisError, OSError):
            if options.keys:  # some keys only: the live keys they match go first
                removed = await self._remove_keys(target, databases, options.keys)
            elif clean:  # the checked file's databases (and a failed restore's, on rollback)
                for db in sorted(databases | {int(str(written(int(d))))
                                              for d in options.also_clean}):
                    async with self.connect(target, db) as r:
                        await r.flushdb()

            async def filtered() -> AsyncIterator[bytes]:
                async for chunk in chunks:
                    if check is not None:
                        check.feed(chunk)  # the whole stream's shape, as ever
                    if keys is None:
                        yield chunk
                    elif out := keys.feed(chunk):
                        yield out
                if keys is not None:
                    keys.finish()
            await self._replay(target, filtered(), progress)
        if options.keys and keys is not None:
            progress.log(f"keys matching {', '.join(options.keys)}: {removed} removed, "
                         f"{keys.kept} restored from the backup ({keys.skipped} others left "
                         "out)")

    async def _remove_keys(self, target: TargetConfig, databases: set[int],
                           patterns: tuple[str, ...]) -> int:
        """Some keys only (issue 25): in each database of the backup, the live keys the
        patterns match are removed, then only the backup's keys they match are restored
        (shared.formats.respkeys); every other key is left as it is. Not one transaction:
        a failure is rolled back from the safety backup (the whole keyspace)."""
        removed = 0
        for db in sorted(databases):
            async with self.connect(target, db) as r:
                for pattern in patterns:
                    batch: list[bytes] = []
                    async for key in r.scan_iter(match=pattern, count=1000):
                        batch.append(key)
                        if len(batch) >= 500:
                            removed += await r.unlink(*batch)
                            batch = []
                    if batch:
                        removed += await r.unlink(*batch)
        return removed

    async def keys_in(self, target: TargetConfig, db: int) -> int:
        """How many keys database `db` holds (RedisError: no such database index)."""
        await self.ping(target)  # a server that cannot be reached is said to be so
        reader, writer = await self._raw(target, db)
        try:
            writer.write(resp(b"DBSIZE"))
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line.startswith(b":") or not line[1:].strip().isdigit():
                raise RedisError(f"DBSIZE answered {line[:60]!r}")
            return int(line[1:])
        finally:
            writer.close()

    async def _raw(self, target: TargetConfig, db: int | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain protocol connection of our own (authenticated, on `db`), for what
        redis-py would hold whole in memory: a restore's stream, a big key's DUMP."""
        u = urlsplit(target.url)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            u.hostname or "127.0.0.1", u.port or 6379, ssl=_tls(u), limit=1 << 20), 10)
        try:
            if target.password is not None:
                auth = [b"AUTH"] + ([unquote(u.username).encode()] if u.username else [])
                writer.write(resp(*auth, target.password.reveal().encode()))
                if not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"+OK"):
                    raise RedisError("Redis refused the credentials")
            if db is not None:
                writer.write(resp(b"SELECT", b"%d" % db))
                if not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"+OK"):
                    raise RedisError(f"Redis refused SELECT {db}")
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _replay(self, target: TargetConfig, chunks: AsyncIterator[bytes],
                      progress: Progress) -> None:
        """Replay the RESP stream verbatim on a connection of our own while a second task
        reads the replies — what `redis-cli --pipe` does: a final ECHO marker tells when
        every reply has arrived. The first error reply fails the restore."""
        reader, writer = await self._raw(target)
        marker = os.urandom(20).hex().encode()
        error: list[bytes] = []

        async def read_replies() -> None:
            buf = b""
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    raise RestoreFailed("Redis closed the connection during the restore")
                buf += data
                lines = buf.split(b"\r\n")
                buf = lines.pop()
                for line in lines:
                    if line.startswith(b"-") and not error:
                        error.append(line[1:])
                    elif line.startswith(b"+"):
                        progress.items_done += 1
                    elif line == marker:
                        return

        try:
            replies = asyncio.create_task(read_replies())
            try:
                async for chunk in chunks:
                    if replies.done() or error:
                        break
                    writer.write(chunk)
                    await writer.drain()
                    progress.bytes_done += len(chunk)
                if not error:
                    writer.write(resp(b"ECHO", marker))
                    await writer.drain()
                    await asyncio.wait_for(asyncio.shield(replies), 300)
            finally:
                if not replies.done():
                    replies.cancel()
                await asyncio.gather(replies, return_exceptions=True)
            failure = replies.exception() if replies.done() and not replies.cancelled() \
                else None
            if failure is not None:
                raise failure
            if error:
                raise RestoreFailed(f"Redis refused a command of the backup: "
                                    f"{error[0].decode(errors='replace')[:300]}")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


class RedisDrill(Drill):
    """Restore drills: a throwaway `redis-server` on a free loopback port (no persistence,
    256 databases), exact keys per database, stopped afterwards."""

    @asynccontextmanager
    async def scratch(self, target: TargetConfig) -> AsyncIterator[TargetConfig]:
        import secrets as _secrets
        import shutil
        import socket
        from dataclasses import replace
        from pathlib import Path

        from shared.config import Secret
        from shared.errors import EngineError
        from worker.subproc import child_env, die_with_parent

        server = shutil.which("redis-server")
        if server is None:
            raise EngineError("the drill needs `redis-server` on the worker (a throwaway "
                              "one is started)", code="drill_unavailable")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.last_scratch = f"redis-server on 127.0.0.1:{port}"
        with private_dir("drill") as tmp_dir:
            tmp = str(tmp_dir)
            # the copy is production data: a random password (from a config file in the
            # 0700 temp dir, never argv), loopback only, and dies with the worker
            password = _secrets.token_hex(24)
            conf = Path(tmp) / "redis.conf"
            # a replica of nothing: a replica neither refuses a RESTORE whose absolute TTL
            # has passed nor expires keys, so keys that expired since the dump still count
            # (the comparison stays exact for caches and sessions) and none vanish mid-count
            # and every DUMP payload is validated deeply before it is loaded (the one part
            # of a RESTORE a hostile file still controls)
            conf.write_text(f"requirepass {password}\nreplicaof 127.0.0.1 1\n"
                            "replica-read-only no\nsanitize-dump-payload yes\n")
            conf.chmod(0o600)
            proc = await asyncio.create_subprocess_exec(
                server, str(conf), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--databases", "256", "--dir", tmp,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env=child_env({}), preexec_fn=die_with_parent)
            try:
                scratch = replace(target, password=Secret(password),
                                  url=f"redis://127.0.0.1:{port}{urlsplit(target.url).path}")
                for _ in range(100):
                    try:
                        async with RedisEngine().connect(scratch) as r:
                            await r.ping()
                        break
                    except Exception:
                        await asyncio.sleep(0.05)
                yield scratch
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

    async def exact_counts(self, target: TargetConfig) -> dict[str, int]:
        async with RedisEngine().connect(target) as r:
            info = await r.info("keyspace")
        return {k: int(v["keys"]) for k, v in info.items()
                if k.startswith("db") and isinstance(v, dict)}

    async def check(self, target: TargetConfig, sql: str) -> bool:
        from shared.errors import EngineError

        raise EngineError("verify_checks are SQL; Redis drills compare keys per database")
