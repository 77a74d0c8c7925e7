"""Progress as clients see it: never past 100 %, never backwards, never over its total."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import pg
from tests.helpers import read_events


async def test_percent_follows_bytes_against_a_size_learned_from_the_last_backup(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """The second backup of a target sizes its bar from the engine's estimate times the
    dump bytes per estimated byte of the first (recorded in its manifest): the total it
    shows from its first progress event is within a quarter of the real size, and the
    percent rises with the bytes instead of sitting at 99 %. A table never analysed (its
    pg_class size is 0) still gets an estimate."""
    from api.app import create_app
    from shared.config import parse_settings
    from tests.conftest import bearer, make_raw_config
    from tests.helpers import running_worker

    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat('x', 200) "
                       "AS body FROM generate_series(1, 200000) g")  # ~50 MB, not analysed
    # and never analysed between the two backups either: an autovacuum run in between
    # would change the estimate's basis (pg_class pages instead of the database size)
    await conn.execute("ALTER TABLE big SET (autovacuum_enabled = false)")
    await conn.close()
    settings = parse_settings(make_raw_config(prefix, tmp_path / "backups", pg_db,
                                              progress_interval=0.05),
                              test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        first = (await (await api.post("/api/v1/targets/main/backups?wait=120")).json())
        m1 = await (await api.get(
            f"/api/v1/targets/main/backups/{first['result']['filename']}")).json()
        assert m1["size_estimate"]["bytes"] > 0 and m1["size_estimate"]["ratio_used"] is None
        second = (await (await api.post("/api/v1/targets/main/backups?wait=120")).json())
    m2 = await (await api.get(
        f"/api/v1/targets/main/backups/{second['result']['filename']}")).json()
    ratio = m2["size_estimate"]["ratio_used"]
    assert ratio == pytest.approx(m1["raw_bytes"] / m1["size_estimate"]["bytes"], rel=0.01)
    events = await read_events(await api.get(f"/api/v1/jobs/{second['id']}/events"))
    shown = [e["data"]["progress"] for e in events if e["event"] == "progress"
             and e["data"]["progress"]["phase"] == "dumping"]
    assert shown, "no progress event while dumping"
    assert abs(shown[0]["bytes_total"] - m2["raw_bytes"]) < 0.25 * m2["raw_bytes"]
    percents = [p["percent"] for p in shown]
    assert percents == sorted(percents) and percents[0] < 90
