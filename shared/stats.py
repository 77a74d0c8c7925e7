"""Figures `/metrics` serves, kept in Redis as jobs finish (so a scrape reads a few hashes,
never every job record): job counts by kind/status/target, a duration histogram per kind and
engine, bytes written per target, and a catalog generation that tells the API when its
cached listings are stale."""

from __future__ import annotations

from redis.asyncio import Redis

from shared.keys import Keys

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 43200.0)


async def job_finished(redis: Redis, keys: Keys, *, kind: str, status: str, target: str,
                       engine: str, duration: float, stored_bytes: int) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.hincrby(keys.metric("jobs"), f"{kind}|{status}|{target}", 1)
    hist = keys.metric(f"duration:{kind}|{engine}")
    for le in DURATION_BUCKETS:
        if duration <= le:
            pipe.hincrby(hist, f"{le:g}", 1)
    pipe.hincrby(hist, "count", 1)
    pipe.hincrbyfloat(hist, "sum", duration)
    if stored_bytes:
        pipe.hincrby(keys.metric("bytes_written"), target, stored_bytes)
    pipe.incr(keys.metric("catalog_generation"))
    await pipe.execute()


async def catalog_changed(redis: Redis, keys: Keys) -> None:
    """Backups were added or removed outside a job (an upload, a delete)."""
    await redis.incr(keys.metric("catalog_generation"))
