"""What every engine's content check shares."""

from __future__ import annotations

from collections.abc import Iterator

from shared.errors import BadRequest


class Unsafe(BadRequest):
    """Content no Safehold restore will run."""

    code = "unsafe_backup"


def sized(chunks: Iterator[bytes], box: list[int]) -> Iterator[bytes]:
    """`chunks`, adding their length to box[0] as they pass."""
    for chunk in chunks:
        box[0] += len(chunk)
        yield chunk
