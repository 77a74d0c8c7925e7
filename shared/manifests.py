"""A manifest read back from storage is hostile input (a shared bucket, a disk restored
from elsewhere): `vet` is how it proves itself before it decides anything.

The object's name is proven by the grammar, so it is the truth: a manifest must name the
same file, the same engine and kind, a `created_at` within a second of the name's
timestamp, a codec chain Safehold knows, a sha256 and a size. One that does not is
*damaged*: it is listed as such (with the name's facts only — nothing it claims), a
restore refuses it, and a prune never lets it decide (it is neither kept nor deleted by a
policy). One damaged manifest never hides the others.

`Manifest` is the one way a manifest is written (a backup Safehold made, an upload): core
facts as typed fields, the engine's own facts in `facts`, never merged over a core key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Required, TypeAlias, TypedDict, cast

from shared import codecs, naming
from shared.errors import PipelineError
from shared.jobs import Requester
from shared.storage.base import Outcome

JsonValue: TypeAlias = "str | int | float | bool | None | list[JsonValue] | dict[str, JsonValue]"

MAX_MANIFEST_BYTES = 16 << 20  # larger than any honest manifest (exact counts included)
CLOCK_SLACK_S = 2.0  # a name's stamp is its start time truncated to the second
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class ManifestDoc(TypedDict, total=False):
    """A manifest as read back and vetted (`vet`), or as listed: the keys vet proves are
    typed; the rest is what the file says — `object` until a reader narrows it (a manifest
    is hostile input). A listing adds `stored_on`; a damaged entry holds only the name's
    facts and `damaged`; a drill adds `verified_at` / `verification` (annotate)."""

    filename: Required[str]
    kind: Required[str]
    engine: Required[str]
    created_at: Required[str]
    damaged: str
    sha256: str
    size_bytes: int
    stored_on: list[str]  # the catalog's own: where a usable copy is now
    damaged_on: list[str]  # the catalog's: destinations whose copy's manifest is damaged
    target: object
    finished_at: object
    duration_s: object
    raw_bytes: object
    codecs: object
    compression: object
    encryption: object
    destinations: object
    partial: object
    warnings: object
    requested_by: object
    job: object
    parent: object
    note: object
    uploaded_sha256: object
    validated: object
    original_filename: object
    verified_at: object
    verification: object
    format_version: object
    # engine facts, as the engines write them (see each engine's dump)
    server_version: object
    tool: object
    format: object
    set: object
    databases: object
    database: object
    roles: object
    globals: object
    counts: object
    count_kind: object
    exact_counts: object
    exact_count_kind: object
    size_estimate: object


class DamagedManifest(PipelineError):
    """A manifest that does not agree with its object: not used for anything but listing
    (as damaged) and deleting."""

    code = "damaged_manifest"
    status = 422


def name_time(name: naming.BackupName) -> str:
    return name.created_at.isoformat().replace("+00:00", "Z")


def damaged(name: naming.BackupName, why: str) -> ManifestDoc:
    """What a listing shows of a backup whose manifest failed: the name's facts only."""
    return {"filename": name.filename, "kind": name.kind, "engine": name.engine,
            "created_at": name_time(name), "damaged": why}


def problems(doc: object, name: naming.BackupName) -> list[str]:
    """Why `doc` cannot be the manifest of the object `name` (empty: it can)."""
    if not isinstance(doc, dict):
        return ["the manifest is not a JSON object"]
    out: list[str] = []
    failed = doc.get("read_failed")
    if failed is not None:  # a reading found the object's bytes are not what it records
        out.append(f"its object was found damaged: {str(failed)[:200]}")
    if doc.get("filename") != name.filename:
        out.append(f"it names the file {str(doc.get('filename'))[:80]!r}, not its own")
    if doc.get("engine") != name.engine:
        out.append(f"its engine {str(doc.get('engine'))[:40]!r} is not the name's")
    if doc.get("kind") != name.kind:
        out.append(f"its kind {str(doc.get('kind'))[:40]!r} is not the name's")
    try:
        created = datetime.fromisoformat(str(doc.get("created_at")).replace("Z", "+00:00"))
        if created.tzinfo is None:
            raise ValueError
        off = (created - name.created_at).total_seconds()
        if not -CLOCK_SLACK_S < off < CLOCK_SLACK_S:
            out.append(f"its created_at {str(doc.get('created_at'))[:40]} is not the "
                       f"name's time {name_time(name)}")
    except (ValueError, TypeError, OverflowError):
        out.append("it has no valid created_at")
    try:
        codecs.chain_of(doc)
    except PipelineError as exc:
        out.append(exc.message[:200])
    if not isinstance(doc.get("sha256"), str) or not _SHA256.match(doc["sha256"]):
        out.append("it has no valid sha256")
    size = doc.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        out.append("it has no valid size_bytes")
    return out


def vet(doc: object, filename: str) -> ManifestDoc:
    """The manifest of the object `filename` (already proven by the grammar), or the
    damaged entry that stands for it. Never raises for what the manifest holds."""
    name = naming.parse_stored(filename)
    try:
        found = problems(doc, name)
    except Exception as exc:  # a shape no check foresaw (types, depth): damaged, not a 500
        found = [f"it cannot be read ({type(exc).__name__})"]
    if found:
        return damaged(name, "; ".join(found)[:500])
    assert isinstance(doc, dict)
    return cast(ManifestDoc, doc)  # its core keys proven above


def count_in(doc: Mapping[str, object], key: str) -> int | None:
    """A manifest's non-negative integer fact (`raw_bytes`…), or None when it holds none
    or something else (a manifest is read back, never believed)."""
    value = doc.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def usable(manifest: ManifestDoc) -> ManifestDoc:
    """`manifest` if it is not damaged; else DamagedManifest naming why."""
    if manifest.get("damaged"):
        raise DamagedManifest(f"the manifest of {manifest.get('filename')} does not agree "
                              f"with its backup ({manifest['damaged']}); it is not used. "
                              "Delete this backup, or restore its manifest from another copy")
    return manifest


def _stamp(at: datetime, timespec: str = "auto") -> str:
    return at.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


@dataclass(frozen=True)
class DumpFacts:
    """What only a backup Safehold dumped itself records."""

    duration_s: float
    job: str
    parent: str | None = None
    warnings: Sequence[str] = ()


@dataclass(frozen=True)
class UploadFacts:
    """What only an uploaded file records."""

    uploaded_sha256: str
    validated: bool
    original_filename: str | None


@dataclass(frozen=True)
class Manifest:
    """A complete backup's manifest, as written beside its object on every destination.

    Exactly one of `dump` / `upload` says how the object came to be. `facts` are the
    engine's (server version, exact counts, a server set's members…): they are written
    after the core keys and may not name one — a collision is a programming error, raised
    here, so no engine can ever override `sha256` or `filename`."""

    name: naming.BackupName
    target: str
    created_at: datetime
    finished_at: datetime
    size_bytes: int
    sha256: str
    raw_bytes: int | None
    chain: Sequence[codecs.Step]
    destinations: Mapping[str, Outcome]
    requested_by: Requester | None
    note: str | None = None
    facts: Mapping[str, object] = field(default_factory=dict)
    dump: DumpFacts | None = None
    upload: UploadFacts | None = None

    CORE_KEYS = frozenset({
        "engine", "kind", "filename", "target", "created_at", "finished_at", "duration_s",
        "size_bytes", "raw_bytes", "sha256", "uploaded_sha256", "codecs", "compression",
        "encryption", "validated", "destinations", "partial", "warnings", "requested_by",
        "job", "parent", "note", "original_filename", "damaged"})

    def __post_init__(self) -> None:
        if (self.dump is None) == (self.upload is None):
            raise ValueError("a manifest is either a dump's or an upload's")
        clash = self.CORE_KEYS & set(self.facts)
        if clash:
            raise ValueError(f"engine facts may not name core manifest keys: {sorted(clash)}")

    @property
    def partial(self) -> bool:
        return any(o.get("status") != "stored" for o in self.destinations.values())

    def document(self) -> dict[str, Any]:
        """The JSON object stored as `<file>.json` (the stored format, unchanged)."""
        steps = codecs.recorded(self.chain)
        squeeze = next((s for s in steps if s["codec"] in ("gzip", "zstd")), None)
        seal = next((s for s in steps if s["codec"] == "age"), None)
        doc: dict[str, Any] = {
            "engine": self.name.engine, "kind": self.name.kind,
            "filename": self.name.filename, "target": self.target,
            "created_at": _stamp(self.created_at),
            "finished_at": _stamp(self.finished_at, "milliseconds")}
        if self.dump is not None:
            doc["duration_s"] = round(self.dump.duration_s, 3)
        doc["size_bytes"] = self.size_bytes
        if self.raw_bytes is not None:
            doc["raw_bytes"] = self.raw_bytes
        doc["sha256"] = self.sha256
        if self.upload is not None:
            doc["uploaded_sha256"] = self.upload.uploaded_sha256
        doc["codecs"] = steps
        doc["compression"] = None if squeeze is None else {
            "algorithm": squeeze["codec"], "level": squeeze.get("level")}
        doc["encryption"] = None if seal is None else {
            "algorithm": "age", "recipients": list(seal.get("recipients", []))}
        if self.upload is not None:
            doc["validated"] = self.upload.validated
        doc["destinations"] = {k: dict(v) for k, v in self.destinations.items()}
        doc["partial"] = self.partial
        doc.update(self.facts)
        if self.dump is not None:
            doc["warnings"] = list(self.dump.warnings) or None
        doc["requested_by"] = self.requested_by
        if self.dump is not None:
            doc["job"], doc["parent"] = self.dump.job, self.dump.parent
        doc["note"] = self.note or None
        if self.upload is not None:
            doc["original_filename"] = self.upload.original_filename
        return doc
