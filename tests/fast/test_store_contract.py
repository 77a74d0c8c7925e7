"""The store contract (tests/support/store_contract.py) held by the in-memory test double
and the local directory store."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.storage.base import BackupStore
from tests.memstore import MemoryStore
from tests.support.store_contract import StoreContract


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BackupStore:
    from shared.storage.local import LocalStorage

    return MemoryStore() if request.param == "memory" else LocalStorage(tmp_path / "backups")


class TestMemoryAndLocalStores(StoreContract):
    pass
