"""Issue 20.9: the plaintext a SQLite backup puts on the worker's disk (its snapshot, even
when the backup is encrypted) lives in Safehold's private temp space — a 0700 directory
of this user, the file 0600 — and what a SIGKILLed worker leaves there is swept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import scratch
from shared.errors import ConfigError


def test_a_planted_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's (or a symlinked) `safehold-<uid>` is never written into."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"safehold-{os.geteuid()}").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="not a directory owned by this user"):
        with scratch.private_dir("sqlite"):
            pass
    assert list(elsewhere.iterdir()) == []


def test_sweep_keeps_live_processes_dirs(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory is swept when no live process holds its lock — whatever pid its name
    carries (a restarted container's worker is pid 1 again, like the one killed)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch.private_dir("drill") as mine:
        left = []
        for name in ("drill-999999999-abcd", f"sqlite-{os.getpid()}-dead"):
            d = scratch.root() / name
            d.mkdir()
            (d / "redis.conf").write_text("requirepass x\n")
            (d / scratch.LOCK).touch()
            os.utime(d / scratch.LOCK, (1, 1))  # made long ago, its process gone
            left.append(name)
        fresh = scratch.root() / "upload-1-fresh"
        fresh.mkdir()  # being made right now: its lock file not there yet
        assert sorted(scratch.sweep()) == sorted(left)
        assert mine.exists() and fresh.exists()
    assert not mine.exists()

