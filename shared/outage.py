"""Riding out a Redis outage (issue 20.3): a restart, a failover or a network blip of a few
seconds must not cost a job that was going fine.

A job's own Redis writes (its progress, events, stages, name claims, lock) go through
`ride_out`, which retries with backoff for up to `[worker] redis_grace` seconds and then
fails the job with the named code `redis_unavailable` — never `internal_error`. Only
errors that mean "Redis did not answer" are ridden out (a refused connection, a timeout,
LOADING after a restart, READONLY during a failover); any other error is a bug and raised
at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.errors import SafeholdError

log = logging.getLogger("safehold.outage")
T = TypeVar("T")

# what "Redis did not answer" looks like (BusyLoadingError is a ConnectionError)
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)


class RedisUnavailable(SafeholdError):
    """Redis stayed unreachable for longer than the job's grace."""

    code = "redis_unavailable"
    status = 503


class JobTakenOver(RedisUnavailable):
    """While this worker could not reach Redis, others took its job for lost (failed it
    `worker_lost`): the job must not publish or commit anything now."""


_RIDDEN: tuple[type[BaseException], ...] = (*UNREACHABLE, RedisUnavailable)  # nested: go on


async def ride_out(what: str, call: Callable[[], Awaitable[T]], grace: float) -> T:
    """`call()`, retried while Redis is unreachable (0.25 s, doubling to 5 s) for up to
    `grace` seconds; then RedisUnavailable naming what could not be done."""
    deadline = time.monotonic() + grace
    delay = 0.25
    warned = False
    while True:
        try:
            result = await call()
        except _RIDDEN as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RedisUnavailable(
                    f"Redis was unreachable for over {grace:.0f}s ({type(exc).__name__}) "
                    f"while {what}. Bring Redis back (or raise "
                    "[worker] redis_grace) and run the job again") from None
            if not warned:
                log.warning("%s: Redis unreachable (%s); retrying for up to %.0fs", what,
                            type(exc).__name__, left)
                warned = True
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)
            continue
        if warned:
            log.warning("%s: Redis answers again", what)
        return result
