"""Neo4j engine against ArcadeDB's Bolt endpoint (a stand-in; see ../shared/SERVICES.md)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import pytest
from neo4j import AsyncGraphDatabase
from neo4j.spatial import CartesianPoint, WGS84Point
from neo4j.time import Date, DateTime, Duration, Time

from shared.config import Settings, parse_settings
from shared.formats.cypher import split_statements
from tests.conftest import ARCADE_PASSWORD, make_raw_config
from tests.helpers import (
    flip_byte,
    form,
    publish_plain,
    read_events,
    restore,
    restore_twice_unchanged,
    stored_bytes,
    stored_manifest,
)

PW_ENV = "SAFEHOLD_TEST_NEO4J_PASSWORD"


@pytest.fixture
async def graph(neo4j_server: int) -> Any:
    """A driver on the stand-in's `neo4j` database, emptied (data and schema) first."""
    driver = AsyncGraphDatabase.driver(f"bolt://127.0.0.1:{neo4j_server}",
                                       auth=("root", ARCADE_PASSWORD))
    await run(driver, "MATCH (n) DETACH DELETE n")
    for c in await run(driver, "SHOW CONSTRAINTS"):
        await run(driver, f"DROP CONSTRAINT `{c['name']}` IF EXISTS")
    for ix in await run(driver, "SHOW INDEXES"):
        if not ix.get("owningConstraint"):
            await run(driver, f"DROP INDEX `{ix['name']}` IF EXISTS")
    yield driver
    await driver.close()


async def run(driver: Any, query: str, **params: Any) -> list[dict[str, Any]]:
    async with driver.session(database="neo4j") as s:
        result = await s.run(query, **params)
        return await result.data()


@pytest.fixture
def settings(prefix: str, tmp_path: Path, neo4j_server: int) -> Settings:
    """Override: target `main` is the stand-in's `neo4j` database, user root."""
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "neo4j", "password_env": PW_ENV,
                               "url": f"bolt://root@127.0.0.1:{neo4j_server}/neo4j"}}
    return parse_settings(raw, {PW_ENV: ARCADE_PASSWORD}, base=tmp_path, source="<test>")


async def load(driver: Any, people: int = 200) -> None:
    await run(driver, "CREATE CONSTRAINT person_uid IF NOT EXISTS FOR (p:Person) "
                      "REQUIRE p.uid IS UNIQUE")
    await run(driver, "CREATE INDEX company_name IF NOT EXISTS FOR (c:Company) ON (c.name)")
    rows = [{"uid": f"p{i}", "name": f"Persön {i}; it's \"quoted\"", "age": i % 90,
             "score": i / 7, "active": i % 2 == 0, "tags": ["a", f"t{i % 5}"],
             "nums": [i, i * 2]} for i in range(people)]
    for start in range(0, people, 1000):
        await run(driver, "UNWIND $rows AS row CREATE (p:Person) SET p = row",
                  rows=rows[start:start + 1000])
    await run(driver, "CREATE (c:Company {uid: 'c1', name: 'Acme; Inc', founded: $d, "
                      "updated: $dt, local: $ldt, opens: $t, lunch: $lt, term: $dur, "
                      "hq: $p, office: $g, logo: $b})",
              d=Date(1999, 12, 31), dt=DateTime(2024, 2, 29, 12, 0, 0, 123456789,
                                                 tzinfo=None).replace(tzinfo=None),
              ldt=DateTime(2024, 1, 1, 10, 0, 0), t=Time(9, 0, 0),
              lt=Time(12, 30, 0), dur=Duration(months=14, days=3, seconds=3600),
              p=CartesianPoint((1.5, 2.5)), g=WGS84Point((10.0, 50.0)),
              b=b"\x00\x01\xffbytes")
    await run(driver, "MATCH (p:Person), (c:Company) WHERE toInteger(substring(p.uid, 1)) % 10 = 0 "
                      "CREATE (p)-[:WORKS_AT {since: 2000 + toInteger(substring(p.uid, 1)) % 20, "
                      "role: 'dev'}]->(c)")
    await run(driver, "MATCH (a:Person {uid: 'p1'}), (b:Person {uid: 'p2'}) "
                      "CREATE (a)-[:KNOWS {w: 1}]->(b), (a)-[:KNOWS {w: 2}]->(b), "
                      "(a)-[:KNOWS {w: 3}]->(a)")


def canon(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{canon(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canon(v) for v in value) + "]"
    return f"{type(value).__name__}:{value!r}"


async def fingerprint(driver: Any) -> dict[str, Any]:
    nodes = sorted(canon({"labels": sorted(r["labels"]), "p": r["p"]}) for r in await run(
        driver, "MATCH (n) RETURN labels(n) AS labels, properties(n) AS p"))
    rels = sorted(canon(r) for r in await run(
        driver, "MATCH (a)-[r]->(b) RETURN a.uid AS a, type(r) AS t, b.uid AS b, "
                "properties(r) AS p"))
    constraints = sorted((c["name"], c["type"], tuple(c["properties"]))
                         for c in await run(driver, "SHOW CONSTRAINTS"))
    indexes = sorted((i["name"], tuple(i["properties"])) for i in await run(
        driver, "SHOW INDEXES") if not i.get("owningConstraint"))
    return {"nodes": hashlib.sha256("\n".join(nodes).encode()).hexdigest(),
            "node_count": len(nodes), "rels": hashlib.sha256("\n".join(rels).encode()
                                                             ).hexdigest(),
            "rel_count": len(rels), "constraints": constraints, "indexes": indexes}


async def backup(api: Any, **body: Any) -> dict[str, Any]:
    job = await (await api.post("/api/v1/targets/main/backups?wait=300", json=body)).json()
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.slow  # (tests/slow holds whole modules of these)
async def test_round_trip_20k_nodes(api: Any, worker: Any, graph: Any, storage_dir: Path
                                    ) -> None:
    """Labels, every property type (temporal, points, bytes, lists), self-loops, parallel
    relationships, relationship properties and a unique constraint survive, for ~20k nodes."""
    await load(graph, people=20_000)
    before = await fingerprint(graph)
    assert before["node_count"] == 20_001 and before["rel_count"] == 2_003
    job = await backup(api)
    name = job["result"]["filename"]
    assert name.startswith("backup_neo4j_") and name.endswith(".cypher.gz")
    await run(graph, "MATCH (p:Person) WHERE p.age > 50 DETACH DELETE p")
    await run(graph, "CREATE (:Intruder {x: 1})")
    job = await (await api.post("/api/v1/targets/main/restores?wait=300",
                                json={"backup": name})).json()
    assert job["status"] == "succeeded", job
    assert await fingerprint(graph) == before
    leftovers = await run(graph, "MATCH (n) WHERE n._safehold_id IS NOT NULL OR "
                                 "n._safehold_bytes IS NOT NULL RETURN count(n) AS c")
    assert leftovers[0]["c"] == 0
    logo = await run(graph, "MATCH (c:Company) RETURN c.logo AS logo")
    assert logo[0]["logo"] == b"\x00\x01\xffbytes"


async def test_script_shape(api: Any, worker: Any, graph: Any, storage_dir: Path) -> None:
    """The script has schema first, batched UNWIND creates, and splits into statements even
    with `;` inside strings."""
    await load(graph)
    job = await backup(api)
    text = gzip.decompress(await stored_bytes(storage_dir, job["result"]["filename"])).decode()
    stmts = split_statements(text)
    assert stmts[0].startswith("CREATE CONSTRAINT person_uid IF NOT EXISTS")
    creates = [s for s in stmts if s.startswith("UNWIND") and "CREATE (n:" in s]
    assert creates and all(s.count("{id:") <= 1000 for s in creates)
    assert any("'Acme; Inc'" in s for s in stmts)
    assert stmts[-1].startswith("DROP INDEX")


async def test_failing_restore_rolls_back(api: Any, worker: Any, graph: Any,
                                          storage_dir: Path) -> None:
    """A statement of an accepted shape that fails on the server (a unique constraint is
    violated) fails the job mid-script; the safety backup is restored."""
    await load(graph)
    good = (await backup(api))["result"]["filename"]
    await run(graph, "CREATE (:Person {uid: 'late', name: 'added since'})")
    before = await fingerprint(graph)
    manifest = await stored_manifest(storage_dir, good)
    text = gzip.decompress(await stored_bytes(storage_dir, good))
    cut = text.index(b"// 3. relationships")
    bad = "backup_neo4j_20200101_000000.cypher.gz"
    clash = (b"UNWIND [{p: {uid: 'same'}}, {p: {uid: 'same'}}] AS row CREATE (n:Person) "
             b"SET n = row.p;\n")
    await publish_plain(storage_dir, bad, text[:cut] + clash + text[cut:], manifest)
    job = await (await api.post("/api/v1/targets/main/restores?wait=300",
                                json={"backup": bad})).json()
    assert job["status"] == "failed"
    assert job["error"]["database_state"] == "rolled_back", job["error"]
    assert await fingerprint(graph) == before


async def test_checksum_progress_stats_and_apoc(api: Any, worker: Any, graph: Any,
                                                storage_dir: Path) -> None:
    """Tampered backups are refused untouched; progress arrives over SSE; stats count
    nodes, relationships, labels and types; use_apoc without APOC is a clear error."""
    await load(graph)
    job = await backup(api)
    events = await read_events(await api.get(f"/api/v1/jobs/{job['id']}/events"))
    assert "dumping" in [e["data"]["phase"] for e in events if e["event"] == "phase"]
    assert job["progress"]["items_done"] == 201 + 23
    path = storage_dir / job["result"]["filename"]
    flip_byte(path, path.stat().st_size // 2)
    before = await fingerprint(graph)
    job = await (await api.post("/api/v1/targets/main/restores?wait=60",
                                json={"backup": job["result"]["filename"]})).json()
    assert job["error"]["code"] == "checksum_mismatch"
    assert await fingerprint(graph) == before
    stats = await (await api.get("/backup/stats")).json()
    assert stats["node_count"] == 201 and stats["relationship_count"] == 23
    assert stats["label_counts"] == {"Company": 1, "Person": 200}
    assert stats["relationship_type_counts"] == {"KNOWS": 3, "WORKS_AT": 20}
    resp = await api.post("/backup/create?use_apoc=true")
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "apoc_unavailable", body


async def test_restore_twice_over_the_live_database(api: Any, worker: Any, graph: Any) -> None:
    """Constraints, indexes, every property type: restoring over the untouched graph,
    twice, changes nothing."""
    await load(graph)
    before = await fingerprint(graph)
    name = (await backup(api))["result"]["filename"]
    await restore_twice_unchanged(api, name, lambda: fingerprint(graph), before)


@pytest.mark.parametrize("statement", [
    "LOAD CSV FROM 'file:///etc/passwd' AS row CREATE (:Leak {line: row[0]})",
    "CALL apoc.load.json('http://127.0.0.1:1/x') YIELD value RETURN value",
    "MATCH (n) CALL apoc.export.csv.all('/tmp/out.csv', {}) YIELD file RETURN file",
    "CALL dbms.security.createUser('eve', 'pw', false)",
    "CREATE USER eve SET PASSWORD 'pw'",
    "DROP DATABASE neo4j",
    "UNWIND [1] AS x CALL { MATCH (n) DETACH DELETE n }",
    "UNWIND [{p: apoc.cypher.runFirstColumnSingle('MATCH (n) DETACH DELETE n', {})}] AS row "
    "CREATE (n) SET n = row.p",
    "CREATE (n {v: dbms.components()})",
])
async def test_statements_outside_the_exporter_shapes_are_refused(
        api: Any, worker: Any, graph: Any, storage_dir: Path, statement: str) -> None:
    await load(graph)
    good = (await backup(api))["result"]["filename"]
    manifest = await stored_manifest(storage_dir, good)
    text = gzip.decompress(await stored_bytes(storage_dir, good))
    hostile = text + statement.encode() + b";\n"
    resp = await api.post("/api/v1/targets/main/uploads",
                          data=form(gzip.compress(hostile), "x.cypher.gz"))
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "unsafe_backup", body
    last_line = hostile.count(b"\n")  # the hostile statement is the script's last line
    assert body["error"]["message"].startswith(f"line {last_line}:"), body
    await run(graph, "CREATE (:Person {uid: 'late', name: 'added since'})")
    before = await fingerprint(graph)
    bad = "upload_neo4j_20200101_000000.cypher.gz"
    await publish_plain(storage_dir, bad, hostile, manifest)
    job = await restore(api, bad, wait=300)
    assert job["status"] == "failed" and job["error"]["code"] == "unsafe_backup", job
    assert job["error"]["database_state"] == "unchanged"
    assert await fingerprint(graph) == before
