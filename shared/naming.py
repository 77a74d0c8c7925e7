"""The backup naming grammar (seed-compatible) — the only way a client string becomes a file.

    name   = kind "_" engine "_" stamp [ "_" seq ] "." ext [ ".gz" | ".zst" ] [ ".age" ]
    kind   = "backup" | "safety_backup" | "upload"
    engine = "postgresql" | "mysql" | "sqlite" | "mongodb" | "redis" | "neo4j"
    stamp  = YYYYMMDD "_" HHMMSS          (UTC)
    seq    = 2..9999                      (a second backup in the same second)

Anything else is rejected; a parsed name contains only [a-z0-9_.] so it can never escape
its target's directory. The suffixes are a courtesy to people: what decodes a file is the
codec chain in its manifest, never its name.

A target's point-in-time archive (PostgreSQL WAL and base backups, MySQL/MariaDB binlogs)
lives beside its backups in a namespace of its own, `<target>.pitr` (a target id never
holds a dot), with a grammar of its own that a client never names:

    archive = akind "_" aengine "_" stamp [ "_" seq ] [ "_" ref ] "." aext suffix
    wal     : ref = SEGMENT (24 hex, PostgreSQL's own name)            aext = "wal"
    walpart : ref = SEGMENT "_" START "-" END (8 hex: bytes of it)     aext = "wal"
    history : ref = TIMELINE (8 hex)                                   aext = "history"
    base    : no ref                                                   aext = "tar"
    binlog     : ref = FILE (8 hex: the binlog file's number)          aext = "binlog"
    binlogpart : ref = FILE "_" START "-" END (8 hex: its bytes)       aext = "binlog"

(aengine: postgresql for the first four, mysql for the binlog kinds.)

`parse_in(target, name)` is the one way a store turns a name into a file: a backup name
in a target, an archive name in its archive, nothing else anywhere.
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


PITR_SUFFIX = ".pitr"  # `<target>.pitr`: the namespace of a target's PITR archive
ARCHIVE_KINDS = ("wal", "walpart", "history", "base", "binlog", "binlogpart")
_SEGMENT = r"[0-9A-F]{24}"
_ARCHIVE_RE = re.compile(
    r"^(?P<kind>wal|walpart|history|base|binlog|binlogpart)_(?P<engine>postgresql|mysql)_"
    r"(?P<stamp>\d{8}_\d{6})(?:_(?P<seq>[2-9]|[1-9]\d{1,3}))?"
    rf"(?:_(?P<ref>{_SEGMENT}(?:_[0-9A-F]{{8}}-[0-9A-F]{{8}})?|[0-9A-F]{{8}}"
    r"(?:_[0-9A-F]{8}-[0-9A-F]{8})?))?"
    r"\.(?P<ext>wal|history|tar|binlog)"
    r"(?P<suffix>(?:\.gz|\.zst)?(?:\.age)?)\Z")
# an archive kind's reference, extension and engine (the grammar above, per kind)
_ARCHIVE_SHAPES = {"wal": (re.compile(rf"{_SEGMENT}\Z"), "wal"),
                   "walpart": (re.compile(rf"{_SEGMENT}_[0-9A-F]{{8}}-[0-9A-F]{{8}}\Z"), "wal"),
                   "history": (re.compile(r"[0-9A-F]{8}\Z"), "history"),
                   "base": (re.compile(r"\Z"), "tar"),
                   "binlog": (re.compile(r"[0-9A-F]{8}\Z"), "binlog"),
                   "binlogpart": (re.compile(r"[0-9A-F]{8}_[0-9A-F]{8}-[0-9A-F]{8}\Z"),
                                  "binlog")}
_ARCHIVE_ENGINE = {"binlog": "mysql", "binlogpart": "mysql"}


@dataclass(frozen=True)
class BackupName:
    kind: str
    engine: str
    created_at: datetime
    seq: int
    ext: str
    suffix: str  # ".gz", ".zst", ".zst.age", ".age" or ""
    ref: str = ""  # an archive object's WAL segment (and byte range) or timeline

    @property
    def filename(self) -> str:
        stamp = self.created_at.strftime("%Y%m%d_%H%M%S")
        seq = f"_{self.seq}" if self.seq > 1 else ""
        ref = f"_{self.ref}" if self.ref else ""
        return f"{self.kind}_{self.engine}_{stamp}{seq}{ref}.{self.ext}{self.suffix}"

    @property
    def archived(self) -> bool:
        """An object of a PITR archive (not a backup)."""
        return self.kind in ARCHIVE_KINDS

    def with_seq(self, seq: int) -> BackupName:
        return BackupName(self.kind, self.engine, self.created_at, seq, self.ext, self.suffix,
                          self.ref)


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


def parse_archive(name: str) -> BackupName:
    """An archive object's name (see the module docstring); InvalidBackupName otherwise."""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise InvalidBackupName("archive object name is too long or not a string")
    m = _ARCHIVE_RE.match(name)
    shape = _ARCHIVE_SHAPES.get(m["kind"]) if m else None
    if m is None or shape is None or not shape[0].match(m["ref"] or "") or \
            m["ext"] != shape[1] or m["engine"] != _ARCHIVE_ENGINE.get(m["kind"],
                                                                       "postgresql"):
        raise InvalidBackupName("not an archive object name: expected e.g. "
                                "wal_postgresql_20241110_120000_000000010000000000000003.wal")
    try:
        created = datetime.strptime(m["stamp"], "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise ImpossibleBackupName(f"no archive object {name!r}: its timestamp is "
                                   "impossible") from None
    return BackupName(kind=m["kind"], engine=m["engine"], created_at=created,
                      seq=int(m["seq"] or 1), ext=m["ext"], suffix=m["suffix"],
                      ref=m["ref"] or "")


def parse_in(target: str, name: str) -> BackupName:
    """A stored object's name where it is stored: a backup name in a target, an archive
    name in a target's archive (`<target>.pitr`); InvalidBackupName for anything else."""
    return parse_archive(name) if target.endswith(PITR_SUFFIX) else parse(name)


def parse_stored(name: str) -> BackupName:
    """A stored object's name of either grammar (what a store already proved it holds)."""
    return parse_archive(name) if _ARCHIVE_RE.match(name or "") else parse(name)


def archive_name(kind: str, at: datetime, ref: str = "", *,
                 codecs: Sequence[str] = ()) -> BackupName:
    """The first-choice name of a new archive object (seq 1)."""
    name = BackupName(kind, _ARCHIVE_ENGINE.get(kind, "postgresql"),
                      at.astimezone(UTC).replace(microsecond=0), 1,
                      _ARCHIVE_SHAPES[kind][1], "".join(SUFFIXES[c] for c in codecs), ref)
    return parse_archive(name.filename)  # never makes a name it would refuse


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
