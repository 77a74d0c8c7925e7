"""What every codec shares: the step a manifest records, the push stage and pull reader
shapes, the magic numbers that name a stored file's outer layer."""

from __future__ import annotations

from typing import Protocol, Required, TypeAlias, TypedDict

from shared.errors import PipelineError

CHUNK = 1 << 20
READ_BLOCK = 256 * 1024  # compressed input per read: bounds the output of one pull
GZIP_WBITS = 31  # gzip container
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
AGE_MAGIC = b"age-encryption.org/v1\n"



class Step(TypedDict, total=False):
    """One layer of a chain. A manifest records every key but `recipient_keys` (the age
    public keys themselves are configuration; the manifest keeps their fingerprints)."""

    codec: Required[str]  # gzip | zstd | age | auto (an upload sealed before it was read)
    level: int
    threads: int
    implementation: str  # gzip: isal or zlib
    recipients: list[str]  # age: recipient fingerprints
    recipient_keys: list[str]  # age: the recipients, for the encoder only


# an age identity or recipient as pyrage makes it: opaque here, only handed back to pyrage
AgeKey: TypeAlias = object


class Stage(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def corrupt(what: str) -> PipelineError:
    return PipelineError(what, code="corrupt_backup")


