"""Restoring some tables only (issue 25, `tables`), MariaDB: after a too-wide UPDATE the
table is the backup's again (rows, AUTO_INCREMENT, its trigger and keys), every other table
exactly as it was (its trigger did not fire into `audit`); twice; a dropped table comes
back; the safety backup holds that table only; unknown and hostile names are refused before
any job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings
from tests import my
from tests.conftest import JobWaiter

SCHEMA = (
    "CREATE TABLE customers (id int PRIMARY KEY AUTO_INCREMENT, name varchar(50))",
    "CREATE TABLE orders (id int PRIMARY KEY AUTO_INCREMENT, customer_id int, "
    "total decimal(10,2), note text, KEY k (customer_id), CONSTRAINT fk FOREIGN KEY "
    "(customer_id) REFERENCES customers (id))",
    "CREATE TABLE audit (id int PRIMARY KEY AUTO_INCREMENT, what text)",
    "CREATE TRIGGER orders_log AFTER UPDATE ON orders FOR EACH ROW "
    "INSERT INTO audit (what) VALUES (CONCAT('o', NEW.id))",
    "CREATE VIEW big AS SELECT * FROM orders WHERE total > 10",
    "INSERT INTO customers (name) VALUES ('a'), ('b')",
    "INSERT INTO orders (customer_id, total, note) VALUES (1, 5, 'x\\ny'), (2, 20, 'z'), "
    "(1, 30, NULL)",
)


@pytest.fixture
def settings(prefix: str, tmp_path: Path, my_db: str) -> Settings:
    return my.target_settings(prefix, tmp_path, my_db)


async def run(db: str, *sql: str) -> None:
    conn = await my.user_conn(db)
    try:
        await my.execute(conn, *sql)
    finally:
        conn.close()


def others(fp: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fp.items() if k not in ("table orders", "data orders", "digest")}


async def test_one_table_after_a_too_wide_update(
        api: Any, worker: Any, my_db: str, wait_job: JobWaiter) -> None:
    await run(my_db, *SCHEMA)
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    name = job["result"]["filename"]
    backed_up = await my.fingerprint(my_db)
    await run(my_db, "UPDATE orders SET total = 0", "INSERT INTO customers (name) VALUES ('c')")
    live = await my.fingerprint(my_db)

    async def restore(**body: Any) -> dict[str, Any]:
        resp = await api.post("/api/v1/targets/main/restores", json={"backup": name, **body})
        assert resp.status == 202, await resp.text()
        return await wait_job((await resp.json())["id"], timeout=120)

    for _ in range(2):
        job = await restore(tables=["orders"])
        assert job["status"] == "succeeded", job.get("error")
        now = await my.fingerprint(my_db)
        assert now["data orders"] == backed_up["data orders"]
        assert now["table orders"] == backed_up["table orders"]
        assert others(now) == others(live)  # audit too: no trigger fired; trigger and view
    safety = job["result"]["safety_backup"]
    manifest = await (await api.get(f"/api/v1/targets/main/backups/{safety}")).json()
    assert manifest["only_tables"] == ["orders"]
    resp = await api.post("/api/v1/targets/main/restores", json={"backup": safety})
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "partial_backup"

    await run(my_db, "SET FOREIGN_KEY_CHECKS = 0", "DROP VIEW big", "DROP TABLE orders")
    job = await restore(tables=["orders"])
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["safety_backup"] is None  # nothing of it was there to keep
    now = await my.fingerprint(my_db)
    assert now["data orders"] == backed_up["data orders"]
    assert now["trigger orders_log"] == backed_up["trigger orders_log"]

    for tables, status, code in [(["nothere"], 422, "table_missing"),
                                 (["orders`; DROP TABLE customers; --"], 400, "invalid_body"),
                                 ([f"{my_db}.orders"], 422, "invalid_body")]:
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "tables": tables})
        assert resp.status == status, (tables, await resp.text())
        assert (await resp.json())["error"]["code"] == code


async def test_rows_of_one_table_read_from_the_backup(
        api: Any, worker: Any, my_db: str, settings: Settings) -> None:
    """Which backup still has order 2? MariaDB: rows read from the dump's INSERT lines of
    that table only (escapes, NULL, binary as hex), stopped at `limit`; bad column 422."""
    await run(my_db, *SCHEMA, "ALTER TABLE customers ADD COLUMN photo varbinary(8)",
              "UPDATE customers SET photo = 0x00ff WHERE id = 1",
              "INSERT INTO customers (name) VALUES ('it''s, (quoted)\\\\ here')")
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    name = job["result"]["filename"]
    await run(my_db, "DELETE FROM orders")
    base = f"/api/v1/targets/main/backups/{name}/contents"
    got = await (await api.get(f"{base}/orders?where=id=2")).json()
    assert got["columns"] == ["id", "customer_id", "total", "note"], got
    assert got["rows"] == [["2", "2", "20.00", "z"]]
    got = await (await api.get(f"{base}/orders?where=customer_id=1")).json()
    assert got["rows"] == [["1", "1", "5.00", "x\ny"], ["3", "1", "30.00", None]]
    got = await (await api.get(f"{base}/customers?limit=5")).json()
    assert got["rows"][0][2] == "\\x00ff" and got["rows"][2][1] == "it's, (quoted)\\ here", got
    got = await (await api.get(f"{base}/orders?limit=1")).json()
    assert len(got["rows"]) == 1 and got["complete"] is False
    for path, status in [("orders?where=nope=1", 422), ("nothere", 422), ("a.b", 422),
                         ("%60x%60", 400)]:
        resp = await api.get(f"{base}/{path}")
        assert resp.status == status, (path, await resp.text())
