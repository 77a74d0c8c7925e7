"""What each engine restores, checked before anything is restored from it.

Every byte of a backup file is untrusted until checked. `validate(engine, path, …)` reads the
whole file once (decompressing it under an inflation bound, hashing the stored bytes) and
raises BadRequest (`invalid_upload` / `unsafe_backup`, with the line or statement at fault)
unless it is content that engine's restore accepts and nothing in it can reach outside the
database. It returns manifest facts found on the way (plain size, counts…). Blocking: run it
in a thread. The API runs it on uploads; the worker runs it again before a restore touches
anything (a file put into storage by hand gets the same checks).

The room: one module per engine's check (`postgresql`, `mysql`, `redis`, `sqlite`, `neo4j`,
`mongodb`), each beside the lexer it stands on (`pgscript`, `mysqlscan`, `resp`, `cypher`,
`tarstream`); `common` holds what they share. A new engine adds its module here and one
line to VALIDATORS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from shared import backup_sets
from shared.codecs import PlainReader, Readable, Step, WindowDigests
from shared.codecs.base import AgeKey
from shared.errors import BadRequest, PipelineError
from shared.formats.common import FileFacts, Unsafe
from shared.formats.mongodb import validate_mongodb
from shared.formats.mysql import validate_mysql
from shared.formats.neo4j import validate_neo4j
from shared.formats.pgscript import UnsafeScript
from shared.formats.postgresql import validate_postgresql
from shared.formats.redis import validate_redis
from shared.formats.sqlite import validate_sqlite


def check_scope(engine: str, url: str, info: FileFacts) -> None:
    """A backup may only touch what its target names: a Redis target scoped to one logical
    database, a MongoDB target scoped to databases in its URL's path."""
    from urllib.parse import unquote, urlsplit

    path = unquote(urlsplit(url).path.strip("/"))
    if engine == "redis" and path.isdigit():
        allowed: set[int] | set[str] = {int(path)}
    elif engine == "mongodb" and path:
        allowed = {d for d in path.split(",") if d}
    else:
        return
    outside = sorted(str(d) for d in set(info.get("databases") or []) - allowed)
    if outside:
        raise Unsafe(f"the backup writes to database(s) {outside}, outside this target "
                     f"({sorted(allowed)}); restore it into the target it came from")


VALIDATORS: dict[str, Callable[[Iterator[bytes]], FileFacts]] = {
    "postgresql": validate_postgresql,
    "sqlite": validate_sqlite,
    "mysql": validate_mysql,
    "redis": validate_redis,
    "neo4j": validate_neo4j,
    "mongodb": validate_mongodb,
}


def validate(engine: str, raw: Readable, chain: Sequence[Step], *, limit: int | None,
             expect_sha256: str | None = None,
             on_stored: Callable[[int], None] | None = None,
             identities: Sequence[AgeKey] = (),
             windows: WindowDigests | None = None,
             set_token: str | None = None) -> FileFacts:
    """Check stored bytes (`raw`, decoded by `chain`) for `engine` (see the module
    docstring). With `expect_sha256` the stored bytes must also match it (IntegrityError).
    `windows`, if given, is fed the plain bytes checked (a restore's load proves it loads
    those). `set_token`: a backup set, each member checked by the engine's validator.
    Blocking: runs in a thread."""
    validator = VALIDATORS.get(engine)
    if validator is None:
        raise BadRequest(f"uploads for {engine} targets are not supported",
                         code="upload_unsupported")
    if set_token is not None:
        validator = backup_sets.validate_set(validator, set_token)
    reader = PlainReader(raw, chain, limit=limit, expect_sha256=expect_sha256,
                         on_stored=on_stored, identities=identities)

    def plain() -> Iterator[bytes]:
        for chunk in reader:
            if windows is not None:
                windows.feed(chunk)
            yield chunk

    try:
        info = validator(plain())
        while (chunk := reader.next_chunk()) is not None:  # the rest (tar padding…)
            if windows is not None:
                windows.feed(chunk)
        return info
    except UnsafeScript:
        raise
    except PipelineError as exc:
        if exc.code in ("checksum_mismatch", "expansion_limit", "wrong_identity",
                        "identity_required"):
            raise
        raise BadRequest(f"the file is not a valid backup: {exc.message}",
                         code="invalid_upload") from None
    finally:
        reader.close()
