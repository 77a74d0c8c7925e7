"""The audit trail: every mutating request and every job outcome.

Each entry is appended to a capped Redis stream (`<prefix>:audit`, ~100k entries) and
logged as one JSON line on the `safehold.audit` logger. Entries never hold secrets: who
(subject, client), what (action), target, backup file, job, result, request id, time.
"""

from __future__ import annotations

import json
import logging

from redis.asyncio import Redis

from shared.jobs import now_iso
from shared.keys import Keys

log = logging.getLogger("safehold.audit")
AUDIT_MAXLEN = 100_000
# client: the token's client (its azp); via: the surface the request came through (cli, web,
# rest for any other HTTP client such as curl, seed, mcp)
FIELDS = ("ts", "action", "result", "status", "subject", "client", "via", "target", "backup",
          "job", "request_id", "remote", "method", "path", "detail")


class AuditLog:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.key = keys.audit

    async def record(self, **entry: object) -> dict[str, object]:
        doc = {k: entry.get(k) for k in FIELDS if entry.get(k) is not None}
        doc.setdefault("ts", now_iso())
        log.info(json.dumps(doc, sort_keys=True))
        await self.redis.xadd(self.key, {"entry": json.dumps(doc)}, maxlen=AUDIT_MAXLEN,
                              approximate=True)
        return doc

    async def query(self, *, limit: int = 100, targets: set[str] | None = None,
                    **filters: str | None) -> list[dict[str, object]]:
        """Newest first; each filter must equal the entry's field (`since`: ts >= value;
        `before`: entries older than that entry id).
        With `targets`, only entries about those targets (none without a target)."""
        since = filters.pop("since", None)
        before = filters.pop("before", None)  # an entry id: the page after one ending there
        wanted = {k: v for k, v in filters.items() if v}
        out: list[dict[str, object]] = []
        if before is not None and before.strip("0-") == "":
            return out  # nothing is older than the stream's first possible id, 0-0
        upper = f"({before}" if before else "+"
        while len(out) < limit:
            rows = await self.redis.xrevrange(self.key, max=upper, min="-", count=500)
            if not rows:
                break
            for entry_id, fields in rows:
                doc = json.loads(fields[b"entry"])
                if since and doc.get("ts", "") < since:
                    return out
                if targets is not None and doc.get("target") not in targets:
                    continue
                if all(str(doc.get(k)) == v for k, v in wanted.items()):
                    out.append({"id": entry_id.decode(), **doc})
                    if len(out) >= limit:
                        break
            upper = f"({rows[-1][0].decode()}"
        return out
