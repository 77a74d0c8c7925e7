"""The naming grammar and the local storage's publish/list/sweep rules."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared import naming
from shared.errors import InvalidBackupName, NotFound, PipelineError
from shared.storage.local import LocalStorage


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


async def publish(storage: LocalStorage, at: datetime, data: bytes = b"data",
                  tag: str = "job1") -> naming.BackupName:
    """Through the catalog's path: reserve a free name, write, complete, manifest last."""
    name = naming.new_name("backup", "postgresql", at, codecs=["gzip"])
    for seq in range(1, 100):
        if not await storage.exists("main", name.with_seq(seq).filename):
            name = name.with_seq(seq)
            break
    pending = await storage.begin("main", name, tag)
    await pending.write(data)
    await pending.complete(len(data), hashlib.sha256(data).hexdigest())
    await pending.write_manifest({"created_at": at.isoformat(), "filename": name.filename})
    return name


async def test_same_second_gets_sequence_numbers(tmp_path: Path) -> None:
    """Two backups in the same second never overwrite each other."""
    s = LocalStorage(tmp_path)
    at = datetime(2024, 11, 10, 12, 0, 0, tzinfo=UTC)
    a, b, c = [await publish(s, at, d) for d in (b"1", b"2", b"3")]
    assert [a.filename, b.filename, c.filename] == [
        "backup_postgresql_20241110_120000.sql.gz",
        "backup_postgresql_20241110_120000_2.sql.gz",
        "backup_postgresql_20241110_120000_3.sql.gz"]
    assert (tmp_path / "main" / b.filename).read_bytes() == b"2"
    assert json.loads((tmp_path / "main" / f"{c.filename}.json").read_text())["filename"] == \
        c.filename


async def test_a_taken_name_is_never_overwritten(tmp_path: Path) -> None:
    """Two writers racing for one name: the second fails `name_taken`, leaves nothing, and
    the first's bytes stand."""
    s = LocalStorage(tmp_path)
    name = naming.new_name("backup", "postgresql", datetime(2024, 1, 1, tzinfo=UTC))
    first, second = await s.begin("main", name, "a"), await s.begin("main", name, "b")
    await first.write(b"one")
    await second.write(b"two")
    await first.complete(3, hashlib.sha256(b"one").hexdigest())
    with pytest.raises(PipelineError) as err:
        await second.complete(3, hashlib.sha256(b"two").hexdigest())
    assert err.value.code == "name_taken"
    await second.abort()
    assert (tmp_path / "main" / name.filename).read_bytes() == b"one"
    assert s.temp_files() == []


async def test_read_back_mismatch_removes_the_copy(tmp_path: Path) -> None:
    """`complete` reads the file back: bytes that are not what was sent are not kept."""
    s = LocalStorage(tmp_path)
    name = naming.new_name("backup", "postgresql", datetime(2024, 1, 1, tzinfo=UTC))
    pending = await s.begin("main", name, "a")
    await pending.write(b"what the disk got")
    with pytest.raises(PipelineError) as err:
        await pending.complete(17, hashlib.sha256(b"what was sent!!!!").hexdigest())
    assert err.value.code == "readback_mismatch"
    assert list((tmp_path / "main").iterdir()) == []


async def test_listing_shows_only_complete_backups(tmp_path: Path) -> None:
    """Temp files, data without manifest and stray files are never listed."""
    s = LocalStorage(tmp_path)
    good = await publish(s, datetime(2024, 1, 1, tzinfo=UTC))
    d = tmp_path / "main"
    (d / "backup_postgresql_20240102_000000.sql.gz").write_bytes(b"no manifest")
    (d / ".tmp-job9-abcd.partial").write_bytes(b"half")
    (d / "notes.txt.json").write_text("{}")
    (d / "backup_postgresql_20240103_000000.sql.gz.json").write_text("{}")  # no data
    assert [m["filename"] for m in await s.list_manifests("main")] == [good.filename]


async def test_sweep_keeps_running_jobs_temps(tmp_path: Path) -> None:
    """Stale temps are swept; a running job's temp is kept; the reaper removes by handle."""
    s = LocalStorage(tmp_path)
    name = naming.new_name("backup", "postgresql", datetime(2024, 1, 1, tzinfo=UTC))
    keep = await s.begin("main", name, "1a2b-running")
    stale = await s.begin("main", name, "1a2b-dead")
    fresh = await s.begin("main", name, "1a2b-uploading")
    reaped = await s.begin("main", name, "1a2b-reaped")
    old = time.time() - 3600
    for t in (keep, stale):
        os.utime(t.temp, (old, old))
    removed = await s.sweep_temps({"1a2b-running"})
    assert fresh.temp.exists()  # recently written: maybe an upload in progress
    assert removed == [f"local:main/{stale.temp.name}"]
    assert keep.temp.exists()
    # a worker died after naming its file but before the manifest: the reaper's handle
    # removes both the temp and the unlisted final file
    await reaped.write(b"abc")
    await reaped.complete(3, hashlib.sha256(b"abc").hexdigest())
    assert (tmp_path / "main" / name.filename).exists()
    await s.remove_temp(reaped.handle)
    assert not reaped.temp.exists() and not (tmp_path / "main" / name.filename).exists()
    await s.remove_temp("local:main/../../etc/passwd")  # not a temp handle: ignored


async def test_delete_removes_manifest_and_data(tmp_path: Path) -> None:
    """Delete takes the backup out of listings and off the disk; twice is NotFound."""
    s = LocalStorage(tmp_path)
    name = await publish(s, datetime(2024, 1, 1, tzinfo=UTC))
    await s.delete("main", name.filename)
    assert await s.list_manifests("main") == []
    with pytest.raises(NotFound):
        await s.delete("main", name.filename)


async def test_files_are_private_by_default(tmp_path: Path) -> None:
    """Backups and manifests 0600, directories 0700 (a backup is a copy of the database);
    a configured mode is honoured."""
    import stat

    s = LocalStorage(tmp_path / "root")
    name = await publish(s, datetime(2024, 1, 1, tzinfo=UTC))
    d = tmp_path / "root" / "main"
    assert stat.S_IMODE((d / name.filename).stat().st_mode) == 0o600
    assert stat.S_IMODE((d / f"{name.filename}.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "root").stat().st_mode) == 0o700
    shared = LocalStorage(tmp_path / "shared", file_mode=0o640)
    name = await publish(shared, datetime(2024, 1, 1, tzinfo=UTC))
    assert stat.S_IMODE((tmp_path / "shared" / "main" / name.filename).stat().st_mode) == 0o640


@pytest.mark.parametrize("mode", ["0755", "777", "rw", "06000"])
def test_file_mode_is_validated(tmp_path: Path, mode: str) -> None:
    from shared.config import parse_settings
    from shared.errors import ConfigError

    raw = {"storage": {"file_mode": mode},
           "targets": {"t": {"engine": "sqlite", "path": "x.db"}}}
    with pytest.raises(ConfigError, match="storage.file_mode"):
        parse_settings(raw, {}, base=tmp_path, source="<t>")
