"""Restoring some tables only (issue 25, `tables`), PostgreSQL: after a too-wide UPDATE the
table equals the backup's and every other table is exactly as it was (fingerprints), the
foreign keys that point at it stay and hold, its trigger neither fires nor stays off;
twice in a row; a dropped table comes back with its indexes, constraints, trigger, policy,
sequence and the foreign keys that pointed at it; a restore that would break a foreign
key changes nothing; the safety backup holds that table only and is its undo; hostile or
unknown names are refused before any job."""

from __future__ import annotations

from typing import Any

import pytest

from tests import pg
from tests.conftest import JobWaiter
from tests.helpers import backup

SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE app.customers (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE app.orders (id serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES app.customers(id),
    total numeric NOT NULL CHECK (total >= 0), note text);
CREATE TABLE app.items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id int NOT NULL REFERENCES app.orders(id) ON DELETE CASCADE, qty int NOT NULL);
CREATE TABLE app.audit (id serial PRIMARY KEY, what text);
CREATE FUNCTION app.log_order() RETURNS trigger LANGUAGE plpgsql AS
    $$BEGIN INSERT INTO app.audit (what) VALUES ('order ' || NEW.id); RETURN NEW; END$$;
CREATE TRIGGER orders_log AFTER INSERT OR UPDATE ON app.orders
    FOR EACH ROW EXECUTE FUNCTION app.log_order();
CREATE INDEX orders_customer ON app.orders (customer_id);
ALTER TABLE app.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY everyone ON app.orders USING (true);
CREATE VIEW app.big_orders AS SELECT * FROM app.orders WHERE total > 100;
COMMENT ON TABLE app.orders IS 'one row per order';
INSERT INTO app.customers (name) SELECT 'customer ' || i FROM generate_series(1, 20) i;
INSERT INTO app.orders (customer_id, total, note)
    SELECT i % 20 + 1, i * 1.5, 'order ' || i FROM generate_series(1, 200) i;
INSERT INTO app.items (order_id, qty) SELECT i % 200 + 1, i FROM generate_series(1, 400) i;
"""
ORDERS = "app.orders"


async def restore(api: Any, wait_job: JobWaiter, **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/v1/targets/main/restores", json=body)
    assert resp.status == 202, await resp.text()
    return await wait_job((await resp.json())["id"], timeout=120)


async def run(database: str, sql: str) -> None:
    conn = await pg.user_conn(database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def catalog(database: str) -> dict[str, Any]:
    conn = await pg.user_conn(database)
    try:
        return {
            "fks": sorted(tuple(r) for r in await conn.fetch(
                "SELECT conrelid::regclass::text, conname, convalidated FROM pg_constraint "
                "WHERE contype = 'f'")),
            "triggers": sorted(tuple(r) for r in await conn.fetch(
                "SELECT tgname, tgenabled::text FROM pg_trigger WHERE NOT tgisinternal")),
            "indexes": sorted(r[0] for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'app'")),
            "policies": [r[0] for r in await conn.fetch("SELECT policyname FROM pg_policies")],
            "rls": await conn.fetchval("SELECT relrowsecurity FROM pg_class "
                                       "WHERE oid = to_regclass('app.orders')"),
            "owned": await conn.fetchval(
                "SELECT CASE WHEN to_regclass('app.orders') IS NOT NULL THEN "
                "pg_get_serial_sequence('app.orders', 'id') END"),
        }
    finally:
        await conn.close()


def others(fp: dict[str, Any]) -> dict[str, Any]:
    return {t: v for t, v in fp["data"].items() if t != ORDERS}


async def test_one_table_after_a_too_wide_update(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter) -> None:
    await run(pg_db, SCHEMA)
    name = (await backup(api))["result"]["filename"]
    backed_up = await pg.fingerprint(pg_db)
    # the incident: every order's total zeroed (its trigger logs 200 rows into audit); life
    # goes on elsewhere: a new customer, an item changed
    await run(pg_db, "UPDATE app.orders SET total = 0; INSERT INTO app.customers (name) "
                     "VALUES ('new'); UPDATE app.items SET qty = qty + 1 WHERE id = 1")
    live = await pg.fingerprint(pg_db)
    shape = await catalog(pg_db)
    for _ in range(2):  # twice in a row: the same outcome
        job = await restore(api, wait_job, backup=name, tables=[ORDERS])
        assert job["status"] == "succeeded", job.get("error")
        now = await pg.fingerprint(pg_db)
        assert now["data"][ORDERS] == backed_up["data"][ORDERS]
        assert others(now) == others(live)  # audit too: the trigger did not fire
        assert now["schema"] == live["schema"]  # keys, trigger, policy, view: as they were
        assert now["sequences"]['"app"."orders_id_seq"'] == \
            backed_up["sequences"]['"app"."orders_id_seq"']
        assert await catalog(pg_db) == shape  # every foreign key back and validated
    safety = job["result"]["safety_backup"]
    assert safety
    manifest = await (await api.get(f"/api/v1/targets/main/backups/{safety}")).json()
    assert manifest["only_tables"] == [ORDERS]
    assert list(manifest["counts"]) == [ORDERS]

    # the safety backup holds one table: never restored over the whole database …
    resp = await api.post("/api/v1/targets/main/restores", json={"backup": safety})
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "partial_backup"
    # … but it is the undo of the table restore
    job = await restore(api, wait_job, backup=safety, tables=[ORDERS],
                        create_safety_backup=False)
    assert job["status"] == "succeeded", job.get("error")
    assert (await pg.fingerprint(pg_db))["data"][ORDERS] == \
        backed_up["data"][ORDERS]  # the safety backup was taken after the first restore


async def test_a_dropped_table_comes_back_whole(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter) -> None:
    await run(pg_db, SCHEMA)
    name = (await backup(api))["result"]["filename"]
    backed_up = await pg.fingerprint(pg_db)
    shape = await catalog(pg_db)
    # the damage people really make: the table dropped with what hangs on it
    await run(pg_db, "DROP TABLE app.orders CASCADE")
    live = await pg.fingerprint(pg_db)
    job = await restore(api, wait_job, backup=name, tables=[ORDERS])
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["safety_backup"] is None  # nothing of it was there to keep
    now = await pg.fingerprint(pg_db)
    assert now["data"][ORDERS] == backed_up["data"][ORDERS]
    assert others(now) == others(live)
    assert now["sequences"] == backed_up["sequences"]
    assert await catalog(pg_db) == shape  # index, trigger, policy, RLS, owned sequence, and
    # items' foreign key to it, validated
    events = await (await api.get(f"/api/v1/jobs/{job['id']}/events")).text()
    assert "app.items.items_order_id_fkey" in events


async def test_a_restore_that_would_break_a_foreign_key_changes_nothing(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter) -> None:
    await run(pg_db, SCHEMA)
    name = (await backup(api))["result"]["filename"]
    # an order the backup does not have, with an item pointing at it
    await run(pg_db, "INSERT INTO app.orders (customer_id, total) VALUES (1, 5); "
                     "INSERT INTO app.items (order_id, qty) VALUES (201, 1)")
    live = await pg.fingerprint(pg_db)
    job = await restore(api, wait_job, backup=name, tables=[ORDERS])
    assert job["status"] == "failed", job
    assert job["error"]["database_state"] == "unchanged", job["error"]
    assert "items_order_id_fkey" in job["error"]["message"]
    assert await pg.fingerprint(pg_db) == live


async def test_another_tables_rows_are_never_touched_by_the_load(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter) -> None:
    """Restoring orders and items together (items point at orders, in either order of
    load) works; restoring a table whose rows the live table's own foreign key cannot
    find fails unchanged."""
    await run(pg_db, SCHEMA)
    name = (await backup(api))["result"]["filename"]
    backed_up = await pg.fingerprint(pg_db)
    await run(pg_db, "DELETE FROM app.items; DELETE FROM app.orders; "
                     "UPDATE app.customers SET name = upper(name)")
    live = await pg.fingerprint(pg_db)
    job = await restore(api, wait_job, backup=name, tables=["app.items", ORDERS])
    assert job["status"] == "succeeded", job.get("error")
    now = await pg.fingerprint(pg_db)
    for t in ("app.items", ORDERS):
        assert now["data"][t] == backed_up["data"][t]
    assert now["data"]["app.customers"] == live["data"]["app.customers"]
    assert now["data"]["app.audit"] == live["data"]["app.audit"]

    await run(pg_db, "DELETE FROM app.items; DELETE FROM app.orders; "
                     "DELETE FROM app.customers WHERE id = 1")
    live = await pg.fingerprint(pg_db)
    job = await restore(api, wait_job, backup=name, tables=[ORDERS])
    assert job["status"] == "failed" and job["error"]["database_state"] == "unchanged"
    assert await pg.fingerprint(pg_db) == live


@pytest.mark.parametrize("tables, status, code", [
    (['app.orders"; DROP TABLE app.items; --'], 400, "invalid_body"),
    # well formed, but not PostgreSQL's schema.table: 422
    (["app.orders.x"], 422, "invalid_body"), (["orders"], 422, "invalid_body"),
    ([".."], 400, "invalid_body"), (["app.ord\x00ers"], 400, "invalid_body"),
    (["app." + "x" * 10_000], 400, "invalid_body"), ([], 400, "invalid_body"),
    ("app.orders", 400, "invalid_body"), (["app.orders", "app.orders"], 400, "invalid_body"),
    (["app.nothere"], 422, "table_missing"),
])
async def test_hostile_or_unknown_table_names_are_refused_before_any_job(
        api: Any, worker: Any, pg_db: str, tables: Any, status: int, code: str,
        wait_job: JobWaiter) -> None:
    await run(pg_db, SCHEMA)
    name = (await backup(api))["result"]["filename"]
    jobs_before = (await (await api.get("/api/v1/jobs")).json())["jobs"]
    resp = await api.post("/api/v1/targets/main/restores",
                          json={"backup": name, "tables": tables})
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["code"] == code
    assert (await (await api.get("/api/v1/jobs")).json())["jobs"] == jobs_before


async def test_rows_of_one_table_read_from_the_backup(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter, settings: Any) -> None:
    """Which backup still has order 42? Its rows come from the backup stream itself (the live
    database has lost them), the read stops at `limit`, a where matches one column's text;
    viewers are refused, the call is audited; bad input is refused before any job."""
    await run(pg_db, SCHEMA + "INSERT INTO app.orders (customer_id, total, note) VALUES "
                              "(3, 7, E'tab\\there\\nnewline'), (3, 8, NULL);")
    name = (await backup(api))["result"]["filename"]
    await run(pg_db, "DELETE FROM app.items; DELETE FROM app.orders")
    base = f"/api/v1/targets/main/backups/{name}/contents/{ORDERS}"
    resp = await api.get(f"{base}?where=id=42")
    assert resp.status == 200, await resp.text()
    got = await resp.json()
    assert got["columns"] == ["id", "customer_id", "total", "note"]
    assert got["rows"] == [["42", "3", "63.0", "order 42"]]
    # every row of the table was read; the rest of the file was not, so its sha256 was not
    # checked (the answer says so)
    assert got["complete"] is True and got["checksum_verified"] is False
    got = await (await api.get(f"{base}?limit=3")).json()
    assert [r[0] for r in got["rows"]] == ["1", "2", "3"]
    assert got["complete"] is False and got["checksum_verified"] is False  # stopped early
    got = await (await api.get(f"{base}?where=customer_id=3&limit=500")).json()
    assert ["201", "3", "7", "tab\there\nnewline"] in got["rows"]
    assert ["202", "3", "8", None] in got["rows"]
    assert all(r[1] == "3" for r in got["rows"])

    from tests.conftest import bearer
    resp = await api.get(base, headers=bearer(settings, "viewer"))
    assert resp.status == 403
    # the job that read the rows: its rows and its where are an operator's to see
    jobs = (await (await api.get("/api/v1/jobs?kind=preview")).json())["jobs"]
    for job in jobs:
        seen = await (await api.get(f"/api/v1/jobs/{job['id']}",
                                    headers=bearer(settings, "viewer"))).json()
        assert "rows" not in (seen.get("result") or {}) and "where" not in seen["params"]
    full = await (await api.get(f"/api/v1/jobs/{jobs[-1]['id']}")).json()
    assert "rows" in full["result"]
    audit = await (await api.get("/api/v1/audit?action=preview_rows")).json()
    assert any("where id=42" in (e.get("backup") or "") for e in audit["entries"])
    for query, status in [("?where=nope=1", 422), ("?where=id", 400), ("?limit=0", 400),
                          ("?limit=100000", 400), ("?where=id=1%00", 400)]:
        resp = await api.get(base + query)
        assert resp.status == status, (query, await resp.text())
    for table, status in [("app.nothere", 422), ("app.orders.x", 422),
                          ("app.%22x%22", 400)]:
        resp = await api.get(f"/api/v1/targets/main/backups/{name}/contents/{table}")
        assert resp.status == status, (table, await resp.text())


async def test_a_table_of_public_with_keys_and_a_trigger(
        api: Any, worker: Any, pg_db: str, wait_job: JobWaiter) -> None:
    """Names the catalog gives back come schema-qualified: a table of `public` with a
    foreign key each way and a trigger is restored under pg_dump's empty search_path."""
    await run(pg_db, """
        CREATE TABLE cust (id int PRIMARY KEY);
        CREATE TABLE ord (id int PRIMARY KEY, cust int REFERENCES cust);
        CREATE TABLE line (ord int REFERENCES ord);
        CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
        CREATE TRIGGER t BEFORE INSERT ON ord FOR EACH ROW EXECUTE FUNCTION noop();
        INSERT INTO cust VALUES (1); INSERT INTO ord VALUES (1, 1), (2, 1);
        INSERT INTO line VALUES (1)""")
    name = (await backup(api))["result"]["filename"]
    await run(pg_db, "UPDATE ord SET cust = NULL")
    shape = await catalog(pg_db)
    job = await restore(api, wait_job, backup=name, tables=["public.ord"])
    assert job["status"] == "succeeded", job.get("error")
    conn = await pg.user_conn(pg_db)
    assert await conn.fetchval("SELECT count(*) FROM ord WHERE cust = 1") == 2
    await conn.close()
    assert await catalog(pg_db) == shape


async def test_the_tables_of_a_schema(api: Any, worker: Any, pg_db: str,
                                      wait_job: JobWaiter) -> None:
    """`schemas`: every table the backup holds in schema app comes back as it was (their
    foreign keys among them and to them kept and valid); a table of another schema, changed
    since, is left exactly as it is; names that are no schema of the backup's are refused
    before any job."""
    await run(pg_db, SCHEMA + "CREATE SCHEMA other; CREATE TABLE other.notes (id int "
              "PRIMARY KEY, body text); INSERT INTO other.notes VALUES (1, 'kept');")
    name = (await backup(api))["result"]["filename"]
    backed_up = await pg.fingerprint(pg_db)
    await run(pg_db, "UPDATE app.orders SET total = 0; UPDATE app.customers SET name = 'x'; "
                     "DELETE FROM app.items WHERE id > 10; INSERT INTO other.notes VALUES "
                     "(2, 'since'); DROP VIEW app.big_orders; DROP TABLE app.audit")
    live = await pg.fingerprint(pg_db)
    for attempt in range(2):
        job = await restore(api, wait_job, backup=name, schemas=["app"])
        assert job["status"] == "succeeded", (attempt, job["error"]["message"])
        now = await pg.fingerprint(pg_db)
        for table, rows in backed_up["data"].items():
            if table.startswith("app."):
                assert now["data"][table] == rows, table
        assert now["data"]["other.notes"] == live["data"]["other.notes"]
    conn = await pg.user_conn(pg_db)
    try:  # the foreign keys are there and hold
        assert await conn.fetchval("SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                                   "AND convalidated") == 2
    finally:
        await conn.close()
    safety = job["result"]["safety_backup"]
    manifest = await (await api.get(f"/api/v1/targets/main/backups/{safety}")).json()
    assert sorted(manifest["only_tables"]) == ["app.audit", "app.customers", "app.items",
                                               "app.orders"]
    jobs_before = (await (await api.get("/api/v1/jobs")).json())["jobs"]
    for schemas, status in [(["nosuch"], 422), (["pg_catalog"], 422), (["a.b"], 400),
                            ([""], 400), (["information_schema"], 422), ([], 400),
                            (["app", "app"], 400), ("app", 400), (["a\x00"], 400)]:
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "schemas": schemas})
        assert resp.status == status, (schemas, await resp.text())
    assert (await (await api.get("/api/v1/jobs")).json())["jobs"] == jobs_before
