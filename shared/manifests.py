"""A manifest read back from storage is hostile input (a shared bucket, a disk restored
from elsewhere): `vet` is how it proves itself before it decides anything.

The object's name is proven by the grammar, so it is the truth: a manifest must name the
same file, the same engine and kind, a `created_at` within a second of the name's
timestamp, a codec chain Safehold knows, a sha256 and a size. One that does not is
*damaged*: it is listed as such (with the name's facts only — nothing it claims), a
restore refuses it, and a prune never lets it decide (it is neither kept nor deleted by a
policy). One damaged manifest never hides the others.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from shared import codecs, naming
from shared.errors import PipelineError

MAX_MANIFEST_BYTES = 16 << 20  # larger than any honest manifest (exact counts included)
CLOCK_SLACK_S = 2.0  # a name's stamp is its start time truncated to the second
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class DamagedManifest(PipelineError):
    """A manifest that does not agree with its object: not used for anything but listing
    (as damaged) and deleting."""

    code = "damaged_manifest"
    status = 422


def name_time(name: naming.BackupName) -> str:
    return name.created_at.isoformat().replace("+00:00", "Z")


def damaged(name: naming.BackupName, why: str) -> dict[str, Any]:
    """What a listing shows of a backup whose manifest failed: the name's facts only."""
    return {"filename": name.filename, "kind": name.kind, "engine": name.engine,
            "created_at": name_time(name), "damaged": why}


def problems(doc: Any, name: naming.BackupName) -> list[str]:
    """Why `doc` cannot be the manifest of the object `name` (empty: it can)."""
    if not isinstance(doc, dict):
        return ["the manifest is not a JSON object"]
    out: list[str] = []
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


def vet(doc: Any, filename: str) -> dict[str, Any]:
    """The manifest of the object `filename` (already proven by the grammar), or the
    damaged entry that stands for it. Never raises for what the manifest holds."""
    name = naming.parse(filename)
    try:
        found = problems(doc, name)
    except Exception as exc:  # a shape no check foresaw (types, depth): damaged, not a 500
        found = [f"it cannot be read ({type(exc).__name__})"]
    if found:
        return damaged(name, "; ".join(found)[:500])
    assert isinstance(doc, dict)
    return doc


def usable(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` if it is not damaged; else DamagedManifest naming why."""
    if manifest.get("damaged"):
        raise DamagedManifest(f"the manifest of {manifest.get('filename')} does not agree "
                              f"with its backup ({manifest['damaged']}); it is not used. "
                              "Delete this backup, or restore its manifest from another copy")
    return manifest
