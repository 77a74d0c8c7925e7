"""Big work directories (a scratch server's data, staged binlog or WAL, a spool) live
under `<tmp>` itself, each locked by the process using it: what a SIGKILLed worker left
there is swept when a worker starts (shared/scratch.py `work_dir`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import scratch


async def test_work_dirs_a_killed_worker_left_are_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scratch server's data directory, staged binlog or a spool (`work_dir`, under
    `<tmp>` itself so a server running as another user reaches it) left by a SIGKILLed
    worker is swept; one in use, another program's `safehold-…` name, or one without a
    lock is not."""
    import asyncio
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", (
        "import asyncio, sys, tempfile; from shared import scratch\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "async def main():\n"
        "    async with scratch.work_dir('scratch') as w:\n"
        "        (w / 'ibdata1').write_bytes(b'x' * 4096)\n"
        "        print(w, flush=True)\n"
        "        await asyncio.sleep(600)\n"
        "asyncio.run(main())\n")], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[2])
    assert child.stdout is not None
    left = Path(child.stdout.readline().strip())
    assert left.stat().st_mode & 0o777 == 0o700 and left.parent.stat().st_mode & 0o777 == 0o711
    async with scratch.work_dir("binlog-pitr") as mine:
        os.utime(left.parent / scratch.LOCK, (1, 1))
        assert left.parent.name not in scratch.sweep()  # its process holds the lock
        child.kill()
        child.wait()
        stranger = tmp_path / "safehold-notes-1-abcdef12"
        stranger.mkdir()
        (stranger / scratch.LOCK).touch()
        os.utime(stranger / scratch.LOCK, (1, 1))
        unlocked = tmp_path / "safehold-pitr-1-abcdef12"
        unlocked.mkdir()
        assert scratch.sweep() == [left.parent.name]
        assert mine.exists() and stranger.exists() and unlocked.exists()
        await asyncio.sleep(0)
    assert not mine.parent.exists()
