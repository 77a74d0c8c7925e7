"""SIGKILL the worker process alone (as the OOM killer would) at several points of a
PostgreSQL restore: the database is always whole — the old state, never half of the new —
the job says so, names the safety backup, and no restore tool is left running."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests import pg, procs
from tests.helpers import wait_for, wait_for_terminal, worker_process

ROWS = 600_000
BIG = f"""
CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL, n int NOT NULL);
INSERT INTO big SELECT g, md5(g::text) || repeat('x', g % 40), g % 1000
FROM generate_series(1, {ROWS}) g;
CREATE INDEX big_n ON big (n);
CREATE INDEX big_payload ON big (payload);
CREATE TABLE child (id int PRIMARY KEY, big_id bigint REFERENCES big (id));
INSERT INTO child SELECT g, 3 * g + 1 FROM generate_series(1, 1000) g;
"""

# an index whose build takes ~2 s whatever the machine's speed (a sleep per row): the
# "index build" point is always there to be caught
SLOW_INDEX = """
CREATE FUNCTION slow_key(bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE
    AS $$ BEGIN PERFORM pg_sleep(0.002); RETURN $1; END $$;
CREATE TABLE slow (id bigint);
INSERT INTO slow SELECT g FROM generate_series(1, 1000) g;
CREATE INDEX slow_ix ON slow (slow_key(id));
"""

# an event trigger that sleeps after an ALTER TABLE … ADD CONSTRAINT … FOREIGN KEY (a
# superuser's, made after the backup): the "foreign keys put back" point is always there
# to be caught, even when the check of a thousand rows takes a millisecond
SLOW_FOREIGN_KEY = """
CREATE FUNCTION slow_fk() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_query() LIKE '%ADD CONSTRAINT%FOREIGN KEY%' THEN PERFORM pg_sleep(2); END IF;
END $$;
CREATE EVENT TRIGGER slow_fk ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION slow_fk();
"""

# where to kill: a predicate over the restore backend's pg_stat_activity row
KILL_POINTS = {
    "between statements": lambda state, query: state == "idle in transaction",
    "mid-COPY": lambda state, query: state == "active" and query.startswith("COPY public.big"),
    "index build": lambda state, query: state == "active" and query.startswith("CREATE INDEX"),
}


async def restore_backend(conn: Any, db: str) -> tuple[str, str] | None:
    row = await conn.fetchrow(
        "SELECT state, query FROM pg_stat_activity WHERE datname = $1 "
        "AND application_name LIKE 'safehold-restore-%' AND backend_type = 'client backend'", db)
    return (row["state"], row["query"]) if row else None


async def test_sigkill_worker_at_each_point_of_a_restore_leaves_the_old_database(
        api: Any, pg_db: str, prefix: str, tmp_path: Path) -> None:
    await pg.load_rich(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute(BIG + SLOW_INDEX)
    await conn.close()
    name = await backup_in_a_worker_of_its_own(api, tmp_path, prefix, pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("DELETE FROM child WHERE id > 500; DELETE FROM big WHERE id % 3 = 0; "
                       "DROP TABLE audit CASCADE")
    await conn.close()
    damaged = await pg.fingerprint(pg_db)
    seen: dict[str, str] = {}

    for point, predicate in KILL_POINTS.items():
        seen[point] = await kill_restore_at(api, tmp_path, prefix, pg_db, {"backup": name},
                                            point, predicate)
        assert await pg.fingerprint(pg_db) == damaged, point
    assert set(seen) == set(KILL_POINTS), seen


async def backup_in_a_worker_of_its_own(api: Any, tmp_path: Path, prefix: str,
                                        pg_db: str) -> str:
    proc = await worker_process(tmp_path, prefix, pg_db)
    try:
        job = await (await api.post("/api/v1/targets/main/backups?wait=120")).json()
        assert job["status"] == "succeeded", job
        return str(job["result"]["filename"])
    finally:
        proc.kill()
        await proc.wait()


async def kill_restore_at(api: Any, tmp_path: Path, prefix: str, pg_db: str,
                          body: dict[str, Any], point: str, predicate: Any) -> str:
    """Start a restore in a worker process of its own, SIGKILL that worker when the
    restore's backend matches `predicate`, and check what the job says: worker lost, the
    database unchanged, the safety backup named. Returns the statement it was killed in."""
    proc = await worker_process(tmp_path, prefix, pg_db)
    try:
        job_id = (await (await api.post("/api/v1/targets/main/restores",
                                        json=body)).json())["id"]

        async def loading(job_id: str = job_id) -> bool:
            job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
            assert job["status"] in ("queued", "running"), job
            return bool(job.get("restore_state") == "uncommitted")

        await wait_for(loading, 120, f"{point}: the restore to start loading")
        watcher = await pg.admin_conn()
        try:
            polls = 0
            while True:
                row = await restore_backend(watcher, pg_db)
                if row and predicate(*row):
                    break
                polls += 1
                if polls % 50 == 0:
                    job = await (await api.get(f"/api/v1/jobs/{job_id}")).json()
                    assert job["status"] == "running", (point, "never reached", job)
            proc.send_signal(signal.SIGKILL)  # the worker alone: psql is not signalled
        finally:
            await watcher.close()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # the restore tool dies with the worker (PR_SET_PDEATHSIG)
    await wait_for(lambda: not procs.find("psql", {"PGDATABASE": pg_db}), 10,
                   "psql to die with the worker")
    job = await wait_for_terminal(api, job_id, timeout=90)
    err = job["error"]
    assert job["status"] == "failed" and err["code"] == "worker_lost", (point, err)
    assert err["database_state"] == "unchanged", (point, err)
    assert err["safety_backup"] and err["safety_backup"] in err["message"], (point, err)
    return str(row[1][:40])


async def test_sigkill_worker_during_a_one_table_restore_leaves_every_table_as_it_was(
        api: Any, pg_db: str, prefix: str, tmp_path: Path) -> None:
    """Issue 25: a restore of `big` alone, killed mid-COPY and while its foreign keys are
    put back: every table as it was, the job names the safety backup (of `big` only)."""
    conn = await pg.user_conn(pg_db)
    await conn.execute(BIG)
    await conn.close()
    name = await backup_in_a_worker_of_its_own(api, tmp_path, prefix, pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("UPDATE big SET n = 0 WHERE id % 7 = 0; DELETE FROM child WHERE id > 900")
    await conn.close()
    admin = await pg.admin_conn(pg_db)
    try:  # the foreign key's ADD CONSTRAINT lasts ~2 s whatever the machine's speed
        await admin.execute(SLOW_FOREIGN_KEY)
    finally:
        await admin.close()
    damaged = await pg.fingerprint(pg_db)
    points = {"mid-COPY": lambda state, query: state == "active"  # the COPY Safehold writes
              and query.startswith('COPY "public"."big"'),
              "foreign keys put back": lambda state, query: state == "active"
              and "ADD CONSTRAINT" in query}
    for point, predicate in points.items():
        await kill_restore_at(api, tmp_path, prefix, pg_db,
                              {"backup": name, "tables": ["public.big"]}, point, predicate)
        assert await pg.fingerprint(pg_db) == damaged, point
