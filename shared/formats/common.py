"""What every engine's content check shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Required, TypedDict

from shared.errors import BadRequest


class MemberFacts(TypedDict, total=False):
    """What the check found in one member of a backup set."""

    database: Required[str]
    counts: dict[str, int]
    count_kind: str


class FileFacts(TypedDict, total=False):
    """What a content check found reading a file: the checker's own findings (an upload's
    manifest facts; what a restore goes by), never what a manifest claims."""

    raw_bytes: Required[int]  # the plain (decoded) size
    tool: str  # what made it, as far as the content shows
    format: str
    databases: list[int] | list[str]  # what it writes to: Redis db numbers, MongoDB names
    counts: dict[str, int]
    count_kind: str
    set_members: list[MemberFacts]  # a backup set's members, in the file's order


class Unsafe(BadRequest):
    """Content no Safehold restore will run."""

    code = "unsafe_backup"


def sized(chunks: Iterator[bytes], box: list[int]) -> Iterator[bytes]:
    """`chunks`, adding their length to box[0] as they pass."""
    for chunk in chunks:
        box[0] += len(chunk)
        yield chunk
