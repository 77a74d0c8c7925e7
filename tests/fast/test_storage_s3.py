"""Destinations: one backup fanned out to a local directory and an S3 bucket (a real
SeaweedFS server), read back, restored from whichever copy is healthy, listed from the
bucket alone by a fresh server, and never leaving an unfinished multipart upload."""

from __future__ import annotations

import pytest

from shared.storage import s3 as s3storage

MiB = 1 << 20


# ---------------------------------------------------------------------------- unit
@pytest.mark.parametrize("total, max_parts", [(10**9, 120), (100 * 10**9, 3700),
                                              (10**12, 7000)])
def test_part_schedule_fits_the_10000_part_limit(total: int, max_parts: int) -> None:
    """Parts grow (8 MiB, doubling every 1000) so 1 GB, 100 GB and 1 TB all fit well under
    S3's 10,000 parts, no part over 5 GiB, and parts above 16 MiB go to disk, not RAM."""
    sent, n = 0, 0
    while sent < total:
        n += 1
        sent += s3storage.part_size(n)
    assert n <= max_parts
    assert s3storage.part_size(n) <= 5 * 1024 * MiB
    assert s3storage.capacity() > 5 * 10**12  # headroom: ~8 TiB at 10,000 parts
    assert s3storage.part_size(1) == 8 * MiB and s3storage.part_size(1001) == 16 * MiB
    part = s3storage._Part(2001)  # 32 MiB: spooled to a temp file
    part.add(b"x" * MiB)
    assert part._file is not None and part._mem == []
    part.close()


# ---------------------------------------------------------------------------- fan-out


# ---------------------------------------------------------------------------- aborts


# ---------------------------------------------------------------------------- reading


