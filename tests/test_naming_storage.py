"""The naming grammar and the local storage's publish/list/sweep rules."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared import naming
from shared.errors import InvalidBackupName, NotFound
from shared.storage import LocalStorage


@pytest.mark.parametrize("name", [
    "backup_postgresql_20241110_120000.sql.gz",
    "backup_postgresql_20241110_120000_2.sql",
    "safety_backup_mysql_20241110_120000.sql.gz",
    "upload_sqlite_20241110_120000.db.gz",
    "backup_redis_20241110_120000.resp.gz.age",
])
def test_valid_names_round_trip(name: str) -> None:
    """Every valid name parses and prints back identically."""
    assert naming.parse(name).filename == name


@pytest.mark.parametrize("name", [
    "", "..", "../backup_postgresql_20241110_120000.sql.gz",
    "/etc/passwd", "backup_postgresql_20241110_120000.sql.gz/../../x",
    "backup_postgresql_20241110_120000.sql.gz\x00.txt", "backup_postgresql_20241310_120000.sql",
    "backup_oracle_20241110_120000.sql", "backup_postgresql_20241110_120000.sql.gz.json",
    ".tmp-abc-123.partial", "backup_postgresql_20241110_120000.exe",
    "backup_postgresql_20241110_120000_1.sql", "backup_postgresql_20241110_120000.sql.gz" + "x",
    "backup_postgresql_20241110_120000．sql", "BACKUP_postgresql_20241110_120000.sql",
    "backup_postgresql_20241110_120000%2Fsql", "a" * 500,
])
def test_invalid_names_rejected(name: str) -> None:
    """Anything off-grammar is rejected, so no client string reaches a path."""
    with pytest.raises(InvalidBackupName):
        naming.parse(name)


def publish(storage: LocalStorage, at: datetime, data: bytes = b"data") -> naming.BackupName:
    temp = storage.create_temp("main", "job1")
    temp.write(data)
    temp.finish()
    name = naming.new_name("backup", "postgresql", at, compressed=True)
    return storage.publish("main", temp.path, name, {"created_at": at.isoformat()})


def test_same_second_gets_sequence_numbers(tmp_path: Path) -> None:
    """Two backups in the same second never overwrite each other."""
    s = LocalStorage(tmp_path)
    at = datetime(2024, 11, 10, 12, 0, 0, tzinfo=UTC)
    a, b, c = publish(s, at, b"1"), publish(s, at, b"2"), publish(s, at, b"3")
    assert [a.filename, b.filename, c.filename] == [
        "backup_postgresql_20241110_120000.sql.gz",
        "backup_postgresql_20241110_120000_2.sql.gz",
        "backup_postgresql_20241110_120000_3.sql.gz"]
    assert (tmp_path / "main" / b.filename).read_bytes() == b"2"
    assert json.loads((tmp_path / "main" / f"{c.filename}.json").read_text())["filename"] == \
        c.filename


def test_listing_shows_only_complete_backups(tmp_path: Path) -> None:
    """Temp files, data without manifest and stray files are never listed."""
    s = LocalStorage(tmp_path)
    good = publish(s, datetime(2024, 1, 1, tzinfo=UTC))
    d = tmp_path / "main"
    (d / "backup_postgresql_20240102_000000.sql.gz").write_bytes(b"no manifest")
    (d / ".tmp-job9-abcd.partial").write_bytes(b"half")
    (d / "notes.txt.json").write_text("{}")
    (d / "backup_postgresql_20240103_000000.sql.gz.json").write_text("{}")  # no data
    assert [m["filename"] for m in s.list_backups("main")] == [good.filename]


def test_sweep_keeps_running_jobs_temps(tmp_path: Path) -> None:
    """Stale temps are swept; a running job's temp is kept."""
    s = LocalStorage(tmp_path)
    keep = s.create_temp("main", "1a2b-running")
    stale = s.create_temp("main", "1a2b-dead")
    fresh = s.create_temp("main", "1a2b-uploading")
    old = time.time() - 3600
    for t in (keep, stale):
        os.utime(t.path, (old, old))
    removed = s.sweep_temps({"1a2b-running"})
    assert fresh.path.exists()  # recently written: maybe an upload in progress
    assert removed == [stale.path]
    assert keep.path.exists()


def test_delete_removes_manifest_and_data(tmp_path: Path) -> None:
    """Delete takes the backup out of listings and off the disk; twice is NotFound."""
    s = LocalStorage(tmp_path)
    name = publish(s, datetime(2024, 1, 1, tzinfo=UTC))
    s.delete("main", name)
    assert s.list_backups("main") == []
    with pytest.raises(NotFound):
        s.delete("main", name)
