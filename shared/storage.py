"""Local backup storage: `<root>/<target>/<file>` plus a `<file>.json` manifest sidecar.

Write order (a crash at any point leaves no half backup listed):
1. bytes go to `<target>/.tmp-<job>-<rand>.partial`, fsynced;
2. the temp file is hard-linked to its final name (`link` never overwrites, so a second
   backup in the same second takes `_2`, `_3`…), the temp name unlinked, the dir fsynced;
3. the manifest is written to a temp name, fsynced and renamed to `<file>.json`.
Listing reads manifests only; a data file without a manifest, or a temp file, is never
listed. Methods are blocking: async callers run them in a thread.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared import naming
from shared.errors import NotFound, PipelineError

MANIFEST_VERSION = 1
TEMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class TempFile:
    """A backup being written; `write` is blocking."""

    path: Path
    handle: BinaryIO

    def write(self, data: bytes) -> None:
        self.handle.write(data)

    def finish(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.path.unlink(missing_ok=True)


class LocalStorage:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def target_dir(self, target: str) -> Path:
        d = self.root / target
        d.mkdir(parents=True, exist_ok=True)
        return d

    def path_of(self, target: str, name: naming.BackupName) -> Path:
        return self.target_dir(target) / name.filename

    def create_temp(self, target: str, job_id: str) -> TempFile:
        path = self.temp_path(target, job_id)
        return TempFile(path, open(path, "xb"))  # noqa: SIM115 - closed by finish/discard

    def temp_path(self, target: str, tag: str) -> Path:
        """A fresh temp name under the target (swept if its job/tag is not running)."""
        return self.target_dir(target) / f"{TEMP_PREFIX}{tag}-{secrets.token_hex(4)}.partial"

    def publish(self, target: str, temp_path: Path, name: naming.BackupName,
                manifest: dict[str, Any]) -> naming.BackupName:
        """Give a finished temp file its final name and write its manifest; returns the name."""
        d = self.target_dir(target)
        for seq in range(1, 10000):
            candidate = name.with_seq(seq)
            final = d / candidate.filename
            if (d / f"{candidate.filename}.json").exists():
                continue
            try:
                os.link(temp_path, final)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - 9999 backups in one second
            raise PipelineError("could not find a free backup name")
        temp_path.unlink()
        _fsync_dir(d)
        manifest = {"format_version": MANIFEST_VERSION, **manifest,
                    "filename": candidate.filename, "target": target}
        self._write_json(d / f"{candidate.filename}.json", manifest)
        return candidate

    def _write_json(self, path: Path, doc: dict[str, Any]) -> None:
        tmp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}.json.partial")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def manifest(self, target: str, name: naming.BackupName) -> dict[str, Any]:
        d = self.root / target
        data = d / name.filename
        try:
            doc: dict[str, Any] = json.loads((d / f"{name.filename}.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"no backup '{name.filename}' for target '{target}'",
                           code="backup_not_found") from None
        if not data.exists():
            raise NotFound(f"backup '{name.filename}' has a manifest but no data file",
                           code="backup_not_found")
        return doc

    def list_backups(self, target: str) -> list[dict[str, Any]]:
        """Manifests of complete backups, newest first."""
        d = self.root / target
        if not d.is_dir():
            return []
        out = []
        for entry in d.iterdir():
            if not entry.name.endswith(".json") or entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                name = naming.parse(entry.name[: -len(".json")])
            except naming.InvalidBackupName:
                continue
            if not (d / name.filename).exists():
                continue
            try:
                out.append(json.loads(entry.read_text()))
            except (OSError, ValueError):
                continue
        out.sort(key=lambda m: (m.get("created_at", ""), m.get("filename", "")), reverse=True)
        return out

    def delete(self, target: str, name: naming.BackupName) -> None:
        """Remove the manifest first (the backup leaves listings), then the data."""
        d = self.root / target
        man = d / f"{name.filename}.json"
        if not man.exists():
            raise NotFound(f"no backup '{name.filename}' for target '{target}'",
                           code="backup_not_found")
        man.unlink()
        (d / name.filename).unlink(missing_ok=True)
        _fsync_dir(d)

    def temp_files(self) -> Iterable[Path]:
        if not self.root.is_dir():
            return []
        return [p for d in self.root.iterdir() if d.is_dir()
                for p in d.glob(f"{TEMP_PREFIX}*.partial")]

    def sweep_temps(self, keep_jobs: set[str], min_age: float = 300.0) -> list[Path]:
        """Delete crash leftovers: temp files of jobs not running, untouched for `min_age`
        seconds (an upload in progress has no job but keeps its file fresh)."""
        removed = []
        now = time.time()
        for p in self.temp_files():
            job_id = p.name[len(TEMP_PREFIX):].rsplit("-", 1)[0]
            if job_id in keep_jobs:
                continue
            try:
                if now - p.stat().st_mtime < min_age:
                    continue
            except FileNotFoundError:
                continue
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed
