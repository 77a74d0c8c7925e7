"""The store contract (tests/support/store_contract.py) held by an S3 bucket on a real
SeaweedFS server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.config import DestinationConfig, Secret
from shared.storage.base import BackupStore
from tests.support.store_contract import StoreContract


@pytest.fixture
async def store(s3_server: Any, bucket: str) -> AsyncIterator[BackupStore]:
    from shared.storage.s3 import S3Storage

    s3 = S3Storage(DestinationConfig(
        "offsite", "s3", endpoint=s3_server.endpoint, bucket=bucket, prefix="safehold",
        access_key=Secret(s3_server.access_key), secret_key=Secret(s3_server.secret_key)))
    yield s3
    await s3.close()


class TestS3Store(StoreContract):
    pass
