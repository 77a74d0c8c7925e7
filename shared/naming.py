"""The backup naming grammar (seed-compatible) — the only way a client string becomes a file.

    name   = kind "_" engine "_" stamp [ "_" seq ] "." ext [ ".gz" | ".zst" ] [ ".age" ]
    kind   = "backup" | "safety_backup" | "upload"
    engine = "postgresql" | "mysql" | "sqlite" | "mongodb" | "redis" | "neo4j"
    stamp  = YYYYMMDD "_" HHMMSS          (UTC)
    seq    = 2..9999                      (a second backup in the same second)

Anything else is rejected; a parsed name contains only [a-z0-9_.] so it can never escape
its target's directory. The suffixes are a courtesy to people: what decodes a file is the
codec chain in its manifest, never its name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.engines import ENGINES, extensions
from shared.errors import ImpossibleBackupName, InvalidBackupName

# engine -> plain (uncompressed) extension of its dump; engine -> formats a client may ask
# for (the first is the default): both from the one table of engine facts
ENGINE_EXTENSIONS: dict[str, str] = {n: f.extension for n, f in ENGINES.items()}
ENGINE_FORMATS: dict[str, tuple[str, ...]] = {n: f.formats for n, f in ENGINES.items()
                                              if f.formats}
KINDS = ("backup", "safety_backup", "upload")
MAX_NAME = 128

_NAME_RE = re.compile(
    r"^(?P<kind>backup|safety_backup|upload)_"
    rf"(?P<engine>{'|'.join(ENGINES)})_"
    r"(?P<stamp>\d{8}_\d{6})(?:_(?P<seq>[2-9]|[1-9]\d{1,3}))?"
    rf"\.(?P<ext>{'|'.join((*extensions(), 'dump'))})"
    r"(?P<suffix>(?:\.gz|\.zst)?(?:\.age)?)\Z"  # \Z: `$` would allow a final newline
)


@dataclass(frozen=True)
class BackupName:
    kind: str
    engine: str
    created_at: datetime
    seq: int
    ext: str
    suffix: str  # ".gz", ".zst", ".zst.age", ".age" or ""

    @property
    def filename(self) -> str:
        stamp = self.created_at.strftime("%Y%m%d_%H%M%S")
        seq = f"_{self.seq}" if self.seq > 1 else ""
        return f"{self.kind}_{self.engine}_{stamp}{seq}.{self.ext}{self.suffix}"

    def with_seq(self, seq: int) -> BackupName:
        return BackupName(self.kind, self.engine, self.created_at, seq, self.ext, self.suffix)


def parse(name: str) -> BackupName:
    """Parse a client-supplied name; raise InvalidBackupName for anything off-grammar."""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise InvalidBackupName("backup name is too long or not a string")
    m = _NAME_RE.match(name)
    if not m:
        raise InvalidBackupName(
            "not a backup name: expected e.g. backup_postgresql_20241110_120000.sql.gz"
        )
    try:
        created = datetime.strptime(m["stamp"], "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise ImpossibleBackupName(f"no backup {name!r}: its timestamp is impossible") \
            from None
    return BackupName(
        kind=m["kind"],
        engine=m["engine"],
        created_at=created,
        seq=int(m["seq"] or 1),
        ext=m["ext"],
        suffix=m["suffix"],
    )


SUFFIXES = {"gzip": ".gz", "zstd": ".zst", "age": ".age"}


def new_name(kind: str, engine: str, at: datetime, *, codecs: Sequence[str] = ("gzip",),
             ext: str | None = None) -> BackupName:
    """The first-choice name of a new backup (seq 1; storage bumps seq on collision);
    `codecs` is the chain's codec names, innermost first."""
    if kind not in KINDS:
        raise ValueError(kind)
    suffix = "".join(SUFFIXES[c] for c in codecs)
    return BackupName(kind, engine, at.astimezone(UTC).replace(microsecond=0), 1,
                      ext or ENGINE_EXTENSIONS[engine], suffix)
