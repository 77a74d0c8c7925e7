"""Per-target lock: one backup or restore of a target at a time.

A second job for the same target waits (status `running`, phase `waiting_for_lock`) until
the first finishes, so requests are queued behind each other, never refused. The lock is a
Redis key holding the job id with a short TTL that the job's heartbeat refreshes; a dead
worker's lock lapses by itself, and the reaper releases it at once when it reaps the job.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from shared import rcmd

# a lock that lapsed while Redis was away (or was lost in a restart) is taken back if
# nobody else took it meanwhile: 1 held, 0 taken by another job
_REFRESH = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class TargetLock:
    def __init__(self, redis: Redis, key: str, owner: str, ttl_s: float = 30.0) -> None:
        self.redis = redis
        self.key = key
        self.owner = owner
        self.ttl_ms = int(ttl_s * 1000)
        self.held = False

    async def try_acquire(self) -> bool:
        """Take the lock if free (or already ours: a retry after an answer lost in an
        outage finds its own SET)."""
        self.held = bool(await self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms)
                         or await self.redis.get(self.key) == self.owner.encode())
        return self.held

    async def acquire(self, poll: float = 0.25) -> None:
        while not await self.try_acquire():
            await asyncio.sleep(poll)

    async def refresh(self) -> bool:
        """Extend the lock; False if another job holds it now (ours lapsed in an outage
        longer than its TTL and was taken)."""
        if not self.held:
            return True
        return bool(await rcmd.eval_script(self.redis,
            _REFRESH, 1, self.key, self.owner, str(self.ttl_ms)))

    async def release(self) -> None:
        if self.held:
            self.held = False
            await release_if_held_by(self.redis, self.key, self.owner)

    async def holder(self) -> str | None:
        v = await self.redis.get(self.key)
        return v.decode() if v else None


async def release_if_held_by(redis: Redis, key: str, owner: str) -> None:
    """Release `key` if `owner` (a job id) still holds it (the reaper, for a dead job)."""
    await rcmd.eval_script(redis, _RELEASE, 1, key, owner)
