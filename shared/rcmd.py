"""Typed calls of the redis-py commands whose stubs answer `Awaitable[T] | T` (one client
class serves sync and asyncio code). With the asyncio client every call is awaitable; these
say so once, with the answer's real type, instead of a `type: ignore` at each call."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, cast

from redis.asyncio import Redis

Value = str | bytes | int | float  # what Redis stores of a value (as its text)


async def hgetall(r: Redis, key: str) -> dict[bytes, bytes]:
    return await cast("Awaitable[dict[bytes, bytes]]", r.hgetall(key))


async def hgetall_text(r: Redis, key: str) -> dict[str, str]:
    """A hash whose fields and values Safehold wrote as text, decoded (a byte that is not
    UTF-8, which Safehold never writes, shows as U+FFFD rather than failing the reader)."""
    return {k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in (await hgetall(r, key)).items()}


async def hget(r: Redis, key: str, field: str) -> bytes | None:
    return await cast("Awaitable[bytes | None]", r.hget(key, field))


async def hmget(r: Redis, key: str, fields: list[str]) -> list[bytes | None]:
    return await cast("Awaitable[list[bytes | None]]", r.hmget(key, fields))


async def hset(r: Redis, key: str, field: str | None = None, value: Value | None = None,
               mapping: Mapping[str, Value] | None = None) -> int:
    call: Any = r.hset  # the stubs want str values; Redis takes any of Value
    return await cast("Awaitable[int]", call(key, field, value, mapping=mapping))


async def hsetnx(r: Redis, key: str, field: str, value: Value) -> bool:
    call: Any = r.hsetnx
    return bool(await cast("Awaitable[int]", call(key, field, value)))


async def hdel(r: Redis, key: str, *fields: str) -> int:
    return await cast("Awaitable[int]", r.hdel(key, *fields))


async def smembers(r: Redis, key: str) -> set[bytes]:
    return await cast("Awaitable[set[bytes]]", r.smembers(key))


async def sadd(r: Redis, key: str, *values: Value) -> int:
    return await cast("Awaitable[int]", r.sadd(key, *values))


async def srem(r: Redis, key: str, *values: Value) -> int:
    return await cast("Awaitable[int]", r.srem(key, *values))


async def eval_script(r: Redis, script: str, numkeys: int, *args: Value) -> Any:
    call: Any = r.eval
    return await cast("Awaitable[Any]", call(script, numkeys, *args))
