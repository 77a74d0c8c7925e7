"""The Redis backup's scan: one server-side step (SCAN + DUMP + expiry, see SCAN_DUMP) at a
time on the backup's own connection, each key written as a RESP `RESTORE … REPLACE`; a
connection lost mid-scan is replaced and the step sent again, on the same server process
only."""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.exceptions import RedisError

from shared.config import TargetConfig
from shared.formats.resp import resp
from worker.progress import Progress

SCAN_COUNT = 1000
SCAN_RECONNECTS = 3  # connections lost mid-scan that a backup rides out


class ConnectionLost(RedisError):
    """The scan's connection closed or broke (the step in flight can be sent again)."""


@dataclass
class Scan:
    """One backup's scan, across its databases."""

    server: str  # the run_id of the server process it began on ("" if unknown)
    absolute: bool  # PEXPIRETIME (Redis 7+), else TIME + PTTL
    lost: int = 0  # connections lost so far

# One SCAN step and the DUMP + expiry of the keys it found, in one read-only call: the keys
# never travel to the client and back. Returns {cursor, now_ms, key, payload, ttl, …};
# a key that vanished between SCAN and DUMP is left out. A key's expiry is absolute: its
# PEXPIRETIME (Redis 7+, ARGV[5] = 1, exact), else the server's clock (TIME, second in
# the reply) plus its PTTL (to a millisecond), however long the step waits client-side.
# When the database holds no key with an expiry (INFO keyspace, read in the same atomic
# step, ARGV[4] is its number), every one would answer -1: none is asked (a third fewer
# calls on the server, whose CPU bounds a backup's speed).
#
SCAN_DUMP = """
local step = redis.call('SCAN', ARGV[1], 'COUNT', ARGV[2])
local now = redis.call('TIME')
local out = {step[1], now[1] * 1000 + math.floor(now[2] / 1000)}
local big = tonumber(ARGV[3])
local keyspace = redis.call('INFO', 'keyspace')
local expiring = tonumber(string.match(keyspace, '\\ndb' .. ARGV[4] .. ':keys=%d+,expires=(%d+)'))
local any_ttl = expiring == nil or expiring > 0
local ttl_command = ARGV[5] == '1' and 'PEXPIRETIME' or 'PTTL'
local held = 0
for _, k in ipairs(step[2]) do
  local payload
  local size = redis.call('MEMORY', 'USAGE', k) or 0
  if size > big or held + size > 2 * big then
    payload = 0
  else
    payload = redis.call('DUMP', k)
    if payload then held = held + #payload end
  end
  if payload then
    out[#out + 1] = k
    out[#out + 1] = payload
    out[#out + 1] = any_ttl and redis.call(ttl_command, k) or -1
  end
end
return out
"""
# RESTORE key 0|abs-ms payload REPLACE [ABSTTL], cut around the payload: a big payload is
# written as it came, never copied into one more buffer of its size
HEAD = b"*5\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$1\r\n0\r\n$%d\r\n"
TAIL = b"\r\n$7\r\nREPLACE\r\n"
HEAD_ABSTTL = b"*6\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n"
TAIL_ABSTTL = b"\r\n$7\r\nREPLACE\r\n$6\r\nABSTTL\r\n"
RESTORE = HEAD + b"%b" + TAIL
RESTORE_ABSTTL = HEAD_ABSTTL + b"%b" + TAIL_ABSTTL
BIG_PAYLOAD = 1 << 20
STREAMED_KEY = 8 << 20  # memory usage from which a key's DUMP is streamed
SCAN_DUMP_SRC = SCAN_DUMP.encode()
STEP_ARGS, BIG_ARG = b"%d" % SCAN_COUNT, b"%d" % STREAMED_KEY


def framing(key: bytes, size: int, expire_at: int | None) -> tuple[bytes, bytes]:
    """The RESTORE command around a payload of `size` bytes: (head, tail)."""
    if expire_at is None:
        return HEAD % (len(key), key, size), TAIL
    ttl = b"%d" % expire_at
    return HEAD_ABSTTL % (len(key), key, len(ttl), ttl, size), TAIL_ABSTTL


class ScanLink:
    """The backup's own connection for the scan steps (see `Redis._dump_db`): replies read
    whole, a step re-sent on a new connection after a loss, on the same server process
    only."""

    def __init__(self, engine: Any, target: TargetConfig, db: int, scan: Scan) -> None:
        self.engine, self.target, self.db, self.scan = engine, target, db, scan
        self.conn: list[Any] = []  # reader, writer, reply parser
        self.in_flight = b"0"  # the cursor of the step sent last

    async def read(self, what: str) -> Any:
        reader, _, replies = self.conn
        try:
            while (got := replies.gets()) is False:
                async with asyncio.timeout(60):  # (wait_for can lose a cancellation)
                    data = await reader.read(1 << 20)
                if not data:
                    raise ConnectionLost("Redis closed the connection during the backup")
                replies.feed(data)
        except TimeoutError:
            raise RedisError(f"no reply to {what} within 60 s") from None
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"the connection to Redis was lost during the backup "
                                  f"({type(exc).__name__})") from None
        except hiredis.ProtocolError as exc:
            raise RedisError(f"a reply that is not Redis protocol ({exc})") from None
        if isinstance(got, hiredis.ReplyError):
            raise RedisError(str(got)[:300])
        return got

    async def connect(self) -> None:
        if self.conn:
            self.conn[1].close()
        reader, writer = await self.engine._raw(self.target, self.db)
        self.conn[:] = [reader, writer, hiredis.Reader()]
        writer.write(resp(b"INFO", b"server"))
        info = await self.read("INFO")
        run_id = re.search(rb"^run_id:(\w+)", info if isinstance(info, bytes) else b"", re.M)
        if self.scan.server and (run_id is None or run_id[1].decode() != self.scan.server):
            raise RedisError("another Redis server process answers than the one the backup "
                             "began on (restarted, or failed over): a scan cannot resume "
                             "there; run the backup again")

    async def reconnect(self, exc: ConnectionLost, progress: Progress) -> None:
        self.scan.lost += 1
        if self.scan.lost > SCAN_RECONNECTS:
            raise RedisError(f"{exc}, {SCAN_RECONNECTS} times over") from None
        for wait in (0.0, 0.5, 1.0, 2.0):  # a proxy or server coming back
            await asyncio.sleep(wait)
            try:
                await self.connect()
                break
            except OSError:
                if wait == 2.0:
                    raise
        progress.warn(f"{exc}; reconnected to the same server process and resumed the "
                      "scan where it was (nothing missed)")
        self.step(self.in_flight)

    def step(self, cursor: bytes) -> None:
        self.in_flight = cursor
        self.conn[1].write(resp(b"EVAL", SCAN_DUMP_SRC, b"0", cursor, STEP_ARGS, BIG_ARG,
                                b"%d" % self.db, b"1" if self.scan.absolute else b"0"))

    async def reply(self) -> list[Any]:
        got = await self.read("a scan step")
        if not isinstance(got, list) or len(got) < 2 or (len(got) - 2) % 3:
            raise RedisError("unexpected reply to the scan step")
        return got

    async def close(self) -> None:
        self.conn[1].close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.conn[1].wait_closed()
