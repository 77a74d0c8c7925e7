"""Fixtures of the servers layer shared by several modules."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests import my, pg


@pytest.fixture
async def createdb_role(pg_db: str) -> AsyncIterator[str]:
    """A role of its own that may create databases (drills' scratch copies, restores beside
    the live database) and is a member of the test role (reads and owns what it does)."""
    role = f"safehold_drill_{uuid.uuid4().hex[:8]}"
    conn = await pg.admin_conn()
    await conn.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{pg.TEST_PASSWORD}' "
                       f"IN ROLE {pg.TEST_USER}")
    await conn.close()
    yield role
    conn = await pg.admin_conn()
    for (db,) in await conn.fetch("SELECT datname FROM pg_database d JOIN pg_roles r ON "
                                  "r.oid = d.datdba WHERE r.rolname = $1", role):
        await conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
    await conn.execute(f"DROP ROLE {role}")
    await conn.close()


@pytest.fixture
async def my_db() -> AsyncIterator[str]:
    """A fresh MariaDB database the password-protected test user may use."""
    await my.ensure_user()
    name = await my.create_database()
    yield name
    await my.drop_database(name)
