"""Redis RESP backups: only the commands a Safehold RESP dump writes."""

from __future__ import annotations

from collections.abc import Iterator

from shared.errors import BadRequest, PipelineError
from shared.formats.common import FileFacts, Unsafe
from shared.formats.resp import RespReader


class RedisScriptCheck:
    """Exactly what Safehold's writer emits: `SELECT n` (n in `allowed` when given), then
    `RESTORE key ttl payload REPLACE [ABSTTL]`. Anything else (CONFIG, MODULE, EVAL,
    FLUSHALL, SLAVEOF…) is refused. Used on the whole file before a restore flushes
    anything, and again on each chunk before the restore sends it (a command is only run
    by Redis once complete, and the check sees it complete first)."""

    def __init__(self, allowed: set[int] | None = None) -> None:
        self.reader = RespReader(max_parts=6)
        self.allowed = allowed
        self.size = self.keys = self.commands = 0
        self.databases: set[int] = set()

    def feed(self, chunk: bytes) -> None:
        if self.size == 0 and chunk.startswith(b"REDIS"):
            raise BadRequest("this is an RDB snapshot: restore it by placing it as the "
                             "server's dump.rdb (see the README); uploads take RESP "
                             "backups", code="invalid_upload")
        self.size += len(chunk)
        try:
            commands = self.reader.feed(chunk)
        except (ValueError, PipelineError) as exc:
            raise BadRequest(f"not a RESP Redis backup: {exc}", code="invalid_upload") \
                from None
        for cmd in commands:
            self.commands += 1
            n = len(cmd)
            if (n == 5 or n == 6) and cmd[0] == b"RESTORE" and cmd[4] == b"REPLACE" \
                    and (n == 5 or cmd[5] == b"ABSTTL") and self.databases \
                    and cmd[2] is not None and cmd[2].isdigit():
                self.keys += 1  # what Safehold writes, spelled as it writes it
                continue
            name = (cmd[0] or b"?").upper()
            arg = [c or b"" for c in cmd]  # None: an argument too long to keep
            if name == b"SELECT" and len(cmd) == 2 and arg[1].isdigit() and len(arg[1]) <= 5 \
                    and (self.allowed is None or int(arg[1]) in self.allowed):
                self.databases.add(int(arg[1]))
            elif (name == b"RESTORE" and self.databases and len(cmd) in (5, 6)
                  and arg[2].isdigit() and arg[4].upper() == b"REPLACE"
                  and (len(cmd) == 5 or arg[5].upper() == b"ABSTTL")):
                self.keys += 1
            else:
                shown = b" ".join(a[:30] for a in arg[:2]).decode("utf-8", "replace")
                raise Unsafe(f"command {self.commands}: {shown!r} is not in a Safehold Redis "
                             "backup (only SELECT n, then RESTORE … REPLACE [ABSTTL])")

    def finish(self) -> FileFacts:
        try:
            self.reader.finish()
        except PipelineError as exc:
            raise BadRequest(f"not a RESP Redis backup: {exc}", code="invalid_upload") \
                from None
        if self.keys == 0 and self.size == 0:
            raise BadRequest("the Redis backup is empty", code="invalid_upload")
        return {"raw_bytes": self.size, "format": "resp", "databases": sorted(self.databases),
                "counts": {"keys": self.keys}, "tool": "RESP (uploaded)"}


def validate_redis(chunks: Iterator[bytes]) -> FileFacts:
    """A RESP stream of SELECT and RESTORE commands (see RedisScriptCheck)."""
    check = RedisScriptCheck()
    for chunk in chunks:
        check.feed(chunk)
    return check.finish()
