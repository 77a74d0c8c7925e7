"""One contract, every store: the local directory, an S3 bucket (a real SeaweedFS) and the
in-memory test double are held to the same promises of shared.storage.base.BackupStore —
nothing listed before its manifest, never an overwrite, a read-back check, ranged reads,
delete manifest-first, annotate without touching the data, crash leftovers removable, and a
manifest that lies listed as damaged."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from typing import Any

import pytest

from shared import naming
from shared.errors import InvalidBackupName, NotFound, PipelineError
from shared.storage.base import BackupStore

TARGET = "main"


def new_name(second: int = 0) -> naming.BackupName:
    return naming.new_name("backup", "postgresql",
                           datetime(2026, 12, 6, 10, 0, second, tzinfo=UTC), ext="sql",
                           codecs=["gzip"])


def manifest_for(name: naming.BackupName, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"filename": name.filename, "engine": name.engine, "kind": name.kind,
            "target": TARGET, "created_at": name.created_at.isoformat().replace(
                "+00:00", "Z"), "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **extra}


async def put(store: BackupStore, name: naming.BackupName, data: bytes,
              manifest: dict[str, Any] | None = None) -> None:
    pending = await store.begin(TARGET, name, "job1")
    for i in range(0, len(data), 700_000):
        await pending.write(data[i:i + 700_000])
    await pending.complete(len(data), hashlib.sha256(data).hexdigest())
    await pending.write_manifest(manifest or manifest_for(name, data))


async def read_all(store: BackupStore, filename: str, start: int = 0,
                   end: int | None = None) -> bytes:
    return b"".join([c async for c in store.open(TARGET, filename, start, end)])


class StoreContract:
    """The promises, for a test class that provides a `store` fixture (see
    tests/fast/test_store_contract.py and tests/servers/test_store_contract_s3.py)."""

    async def test_a_backup_round_trips_and_is_listed_only_with_its_manifest(
            self, store: BackupStore) -> None:
        data = os.urandom(3 * (1 << 20) + 123)
        name = new_name()
        pending = await store.begin(TARGET, name, "job1")
        await pending.write(data)
        await pending.complete(len(data), hashlib.sha256(data).hexdigest())
        assert await store.list_manifests(TARGET) == []  # no manifest yet: not a backup
        await pending.write_manifest(manifest_for(name, data, note="n"))
        listed = await store.list_manifests(TARGET)
        assert [m["filename"] for m in listed] == [name.filename] and not listed[0].get("damaged")
        got = await store.read_manifest(TARGET, name.filename)
        assert got["note"] == "n" and got["sha256"] == hashlib.sha256(data).hexdigest()
        assert await store.size(TARGET, name.filename) == len(data)
        assert await read_all(store, name.filename) == data
        assert await read_all(store, name.filename, 10, 20) == data[10:21]
        assert await read_all(store, name.filename, len(data) - 5) == data[-5:]
        assert await store.exists(TARGET, name.filename)
        assert await store.list_manifests("other") == []


    async def test_never_an_overwrite_and_a_read_back_check(self, store: BackupStore) -> None:
        data = b"first" * 1000
        name = new_name(1)
        await put(store, name, data)
        second = await store.begin(TARGET, name, "job2")
        await second.write(b"second")
        with pytest.raises(PipelineError) as taken:
            await second.complete(6, hashlib.sha256(b"second").hexdigest())
        assert taken.value.code == "name_taken"
        await second.abort()
        assert await read_all(store, name.filename) == data  # the first one, untouched
        other = new_name(2)  # the store holds 13 bytes where 14 were meant: refused
        lying = await store.begin(TARGET, other, "job3")
        await lying.write(b"what was sent")
        with pytest.raises(PipelineError) as mismatch:
            await lying.complete(14, hashlib.sha256(b"what was sent!").hexdigest())
        assert mismatch.value.code == "readback_mismatch"
        await lying.abort()
        assert not await store.exists(TARGET, other.filename)
        assert [m["filename"] for m in await store.list_manifests(TARGET)] == [name.filename]


    async def test_abort_and_crash_leftovers_leave_nothing(self, store: BackupStore) -> None:
        aborted = new_name(3)
        pending = await store.begin(TARGET, aborted, "job4")
        await pending.write(b"x" * 1000)
        await pending.abort()
        await pending.abort()  # idempotent
        assert not await store.exists(TARGET, aborted.filename)
        crashed = new_name(4)  # completed, then the worker died before the manifest
        pending = await store.begin(TARGET, crashed, "job5")
        await pending.write(b"y" * 1000)
        await pending.complete(1000, hashlib.sha256(b"y" * 1000).hexdigest())
        await store.remove_temp(pending.handle)
        assert not await store.exists(TARGET, crashed.filename)
        assert await store.list_manifests(TARGET) == []


    async def test_delete_annotate_and_not_found(self, store: BackupStore) -> None:
        data = b"z" * 5000
        name = new_name(5)
        await put(store, name, data)
        await store.annotate(TARGET, name.filename, {"verified_at": "2026-12-06T11:00:00Z"})
        got = await store.read_manifest(TARGET, name.filename)
        assert got["verified_at"] == "2026-12-06T11:00:00Z" and got["size_bytes"] == 5000
        assert await read_all(store, name.filename) == data  # the data is never touched
        await store.delete(TARGET, name.filename)
        assert await store.list_manifests(TARGET) == []
        assert not await store.exists(TARGET, name.filename)
        for call in (store.read_manifest(TARGET, name.filename),
                     store.size(TARGET, name.filename), store.delete(TARGET, name.filename)):
            with pytest.raises(NotFound) as missing:
                await call
            assert missing.value.code == "backup_not_found"
        with pytest.raises(NotFound):
            await read_all(store, name.filename)
        health = await store.health()
        assert health["reachable"] is True


    async def test_a_manifest_that_lies_is_listed_as_damaged(self, store: BackupStore) -> None:
        data = b"w" * 100
        name, other = new_name(6), new_name(7)
        await put(store, name, data, {**manifest_for(name, data), "filename": other.filename})
        listed = await store.list_manifests(TARGET)
        assert len(listed) == 1 and listed[0]["filename"] == name.filename
        assert "names the file" in listed[0]["damaged"]
        got = await store.read_manifest(TARGET, name.filename)
        assert got.get("damaged")


    async def test_a_refused_writer_leaves_the_winners_object_alone(
            self, store: BackupStore) -> None:
        """Two writers of one name: the second's completion is refused (name_taken) while the
        first has not written its manifest yet; the loser's abort must not take the winner's
        object with it (a review found S3 did, after a change to its leftover cleanup)."""
        data = b"winner" * 100
        name = new_name(8)
        winner = await store.begin(TARGET, name, "job6")
        await winner.write(data)
        await winner.complete(len(data), hashlib.sha256(data).hexdigest())
        loser = await store.begin(TARGET, name, "job7")
        await loser.write(b"loser")
        with pytest.raises(PipelineError) as taken:
            await loser.complete(5, hashlib.sha256(b"loser").hexdigest())
        assert taken.value.code == "name_taken"
        await loser.abort()
        await winner.write_manifest(manifest_for(name, data))
        assert [m["filename"] for m in await store.list_manifests(TARGET)] == [name.filename]
        assert await read_all(store, name.filename) == data

    async def test_a_targets_archive_is_a_namespace_of_its_own(
            self, store: BackupStore) -> None:
        """A PITR archive (`<target>.pitr`) holds archive objects only, listed and read
        like backups (manifest last, read back, vetted), never beside the target's
        backups; a backup name is refused there and an archive name in the target."""
        archive = f"{TARGET}{naming.PITR_SUFFIX}"
        at = datetime(2026, 12, 6, 10, 0, 0, tzinfo=UTC)
        seg = naming.archive_name("wal", at, "000000010000000000000003", codecs=["zstd"])
        part = naming.archive_name("walpart", at, "000000010000000000000004_00000000-00001000")
        data = os.urandom(5000)
        for name in (seg, part):
            pending = await store.begin(archive, name, "streamer")
            await pending.write(data)
            await pending.complete(len(data), hashlib.sha256(data).hexdigest())
            await pending.write_manifest({**manifest_for(name, data), "target": TARGET,
                                          "codecs": []})
        listed = await store.list_manifests(archive)
        assert sorted(m["filename"] for m in listed) == sorted([seg.filename, part.filename])
        assert not any(m.get("damaged") for m in listed)
        assert b"".join([c async for c in store.open(archive, seg.filename)]) == data
        assert await store.list_manifests(TARGET) == []  # the target's backups: none
        with pytest.raises(InvalidBackupName):
            await store.begin(archive, new_name(), "job1")
        with pytest.raises(InvalidBackupName):
            await store.read_manifest(TARGET, seg.filename)
        await store.delete(archive, seg.filename)
        assert [m["filename"] for m in await store.list_manifests(archive)] == [part.filename]
