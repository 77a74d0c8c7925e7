"""REST v1 surface: bad inputs, listing, download, delete, idempotency, health, OpenAPI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from api.context import SETTINGS
from api.routes import ROUTES
from tests import pg
from tests.helpers import backup


async def error_of(resp: Any) -> dict[str, Any]:
    body = await resp.json()
    assert set(body) >= {"error"}, body
    assert set(body["error"]) >= {"code", "message"}
    return body["error"]


async def test_healthz_and_openapi(api: Any) -> None:
    """/healthz answers without a worker; the OpenAPI document lists every route."""
    resp = await api.get("/healthz")
    assert resp.status == 200
    doc = await (await api.get("/api/v1/openapi.json")).json()
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        assert op["x-required-role"] == r.role.name.lower()


async def test_docs_are_served_from_the_package_without_a_token(anon: Any) -> None:
    """/docs (the seed README's link) is Swagger UI from packaged files, no CDN, no inline
    script; it reads the public OpenAPI document, which documents the bearer scheme and
    the seed surface."""
    page = await anon.get("/docs")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert "<script>" not in html and "http://" not in html and "https://" not in html
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    js = await anon.get("/docs/swagger-ui-bundle.js")
    assert js.status == 200 and len(await js.read()) > 100_000
    init = await (await anon.get("/docs/safehold-docs.js")).text()
    assert '"/api/v1/openapi.json"' in init
    assert (await anon.get("/docs/..%2Fpyproject.toml")).status == 404
    assert (await anon.get("/docs/index.j2")).status == 404
    doc = await (await anon.get("/api/v1/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "/backup/create" in doc["paths"] and "/mcp" in doc["paths"]


async def test_readyz_needs_a_live_worker(api: Any) -> None:
    """/readyz is 503 with a reason when no worker is alive."""
    resp = await api.get("/readyz")
    assert resp.status == 503
    assert (await error_of(resp))["code"] == "not_ready"


async def test_readyz_ok_with_worker(api: Any, worker: Any) -> None:
    """/readyz is 200 once a worker heartbeats."""
    import asyncio

    for _ in range(50):
        resp = await api.get("/readyz")
        if resp.status == 200:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 200
    assert (await resp.json())["checks"]["workers"] == 1


def bearer_of(api: Any, *roles: str, subject: str) -> dict[str, str]:
    from tests.conftest import token

    settings = api.server.app[SETTINGS]
    return {"Authorization": f"Bearer {token(settings, *roles, subject=subject)}"}


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("POST", "/api/v1/targets/nope/backups", None, 404, "target_not_found"),
    ("GET", "/api/v1/targets/nope/backups", None, 404, "target_not_found"),
    ("POST", "/api/v1/targets/main/backups", "not json", 400, "invalid_json"),
    ("POST", "/api/v1/targets/main/backups", [1, 2], 400, "invalid_body"),
    ("POST", "/api/v1/targets/main/backups", {"compress": "yes"}, 400, "invalid_body"),
    ("POST", "/api/v1/targets/main/backups", {"surprise": 1}, 400, "invalid_body"),
    ("POST", "/api/v1/targets/main/backups?wait=-1", {}, 400, "invalid_query"),
    ("POST", "/api/v1/targets/main/backups?wait=abc", {}, 400, "invalid_query"),
    ("POST", "/api/v1/targets/main/restores", {}, 400, "invalid_body"),
    ("POST", "/api/v1/targets/main/restores", {"backup": "../../etc/passwd"}, 400,
     "invalid_backup_name"),
    ("POST", "/api/v1/targets/main/restores",
     {"backup": "backup_postgresql_20240101_000000.sql.gz"}, 404, "backup_not_found"),
    ("GET", "/api/v1/targets/main/backups/..%2F..%2Fsafehold.toml", None, 400,
     "invalid_backup_name"),
    ("GET", "/api/v1/targets/main/backups/backup_postgresql_20240101_000000.sql.gz", None,
     404, "backup_not_found"),
    ("DELETE", "/api/v1/targets/main/backups/.tmp-x.partial", None, 400,
     "invalid_backup_name"),
    ("GET", "/api/v1/jobs/does-not-exist", None, 404, "job_not_found"),
    ("DELETE", "/api/v1/jobs/does-not-exist", None, 404, "job_not_found"),
    ("GET", "/api/v1/jobs?status=weird", None, 400, "invalid_query"),
    ("GET", "/api/v1/jobs/does-not-exist/events", None, 404, "job_not_found"),
    ("GET", "/api/v1/nothing-here", None, 404, "not_found"),
    ("PUT", "/api/v1/jobs", None, 405, "method_not_allowed"),
])
async def test_bad_requests_get_json_errors(api: Any, method: str, path: str, body: Any,
                                            status: int, code: str) -> None:
    """Bad input gets the right status and a JSON error with a stable code."""
    kw: dict[str, Any] = {}
    if isinstance(body, str):
        kw["data"] = body
        kw["headers"] = {"Content-Type": "application/json"}
    elif body is not None:
        kw["json"] = body
    resp = await api.request(method, path, **kw)
    assert resp.status == status, await resp.text()
    assert (await error_of(resp))["code"] == code


async def test_restore_of_other_engine_backup_is_refused(api: Any, storage_dir: Path) -> None:
    """A backup of another engine cannot be restored into this target."""
    storage_dir.mkdir(parents=True)
    name = "backup_redis_20240101_000000.resp.gz"
    (storage_dir / name).write_bytes(b"x")
    (storage_dir / f"{name}.json").write_text(json.dumps({"engine": "redis"}))
    resp = await api.post("/api/v1/targets/main/restores", json={"backup": name})
    assert resp.status == 400
    assert (await error_of(resp))["code"] == "engine_mismatch"


async def test_idempotency_key_returns_the_same_job(api: Any, worker: Any, pg_db: str) -> None:
    """A repeated submit with the same Idempotency-Key returns the first job."""
    h = {"Idempotency-Key": "nightly-2024-11-10"}
    a = await (await api.post("/api/v1/targets/main/backups", json={}, headers=h)).json()
    b = await (await api.post("/api/v1/targets/main/backups", json={}, headers=h)).json()
    assert a["id"] == b["id"]
    c = await (await api.post("/api/v1/targets/main/backups", json={})).json()
    assert c["id"] != a["id"]
    # the same key with another body is refused, not answered with the first job
    other = await api.post("/api/v1/targets/main/backups", json={"note": "else"}, headers=h)
    assert other.status == 409
    assert (await error_of(other))["code"] == "idempotency_key_reused"
    # keys belong to their caller: another subject's same key is another job
    them = {**h, **bearer_of(api, "operator", subject="someone-else")}
    d = await (await api.post("/api/v1/targets/main/backups", json={}, headers=them)).json()
    assert d["id"] != a["id"]


async def test_hostile_bodies_and_head(api: Any, worker: Any, pg_db: str) -> None:
    """A JSON body nested 100,000 deep is a 400, not a 500; downloads answer HEAD."""
    deep = "[" * 100_000 + "]" * 100_000
    resp = await api.post("/api/v1/targets/main/backups", data=deep,
                          headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await error_of(resp))["code"] == "invalid_json"
    name = (await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
            )["result"]["filename"]
    head = await api.head(f"/api/v1/targets/main/backups/{name}/download")
    assert head.status == 200 and int(head.headers["Content-Length"]) > 0
    assert head.headers["X-Checksum-SHA256"] and await head.read() == b""
    assert (await api.head(f"/backup/download/{name}")).status == 200


async def test_list_download_range_and_delete(api: Any, worker: Any, pg_db: str,
                                              storage_dir: Path) -> None:
    """Backups list newest first, download whole or by Range, and delete cleanly."""
    await pg.load_rich(pg_db)
    first = (await backup(api))["result"]
    second = (await backup(api))["result"]
    body = await (await api.get("/api/v1/targets/main/backups")).json()
    assert [b["filename"] for b in body["backups"]] == [second["filename"], first["filename"]]
    assert body["total_count"] == 2
    if first["filename"][:-7] == second["filename"][:-7].rsplit("_", 1)[0]:
        assert "_2." in second["filename"]  # same second: a sequence number, no overwrite

    name = first["filename"]
    resp = await api.get(f"/api/v1/targets/main/backups/{name}/download")
    data = await resp.read()
    assert resp.status == 200
    assert hashlib.sha256(data).hexdigest() == first["sha256"]
    assert f'filename="{name}"' in resp.headers["Content-Disposition"]
    assert int(resp.headers["Content-Length"]) == first["size_bytes"]
    resp = await api.get(f"/api/v1/targets/main/backups/{name}/download",
                         headers={"Range": "bytes=10-19"})
    assert resp.status == 206
    assert await resp.read() == data[10:20]

    resp = await api.delete(f"/api/v1/targets/main/backups/{name}")
    assert resp.status == 200
    assert not (storage_dir / name).exists() and not (storage_dir / f"{name}.json").exists()
    resp = await api.get(f"/api/v1/targets/main/backups/{name}")
    assert resp.status == 404


async def test_contents_of_a_backup_from_its_manifest(
        api: Any, anon: Any, worker: Any, pg_db: str, settings: Any) -> None:
    """GET …/backups/{file}/contents (viewer): each table with the rows the dump held,
    exact (counted as the dump passed), from the manifest alone; bad and unknown names
    answer 400 / 404; a manifest's hostile counts are shown as nothing, never echoed."""
    from shared.contents import contents
    from tests.conftest import bearer

    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    resp = await anon.get(f"/api/v1/targets/main/backups/{name}/contents",
                          headers=bearer(settings, "viewer"))
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    counted = {i["name"]: i["count"] for i in doc["items"]}
    conn = await pg.user_conn(pg_db)
    rows = int(await conn.fetchval("SELECT count(*) FROM everything"))
    await conn.close()
    assert doc["exact"] and doc["unit"] == "rows" and counted["public.everything"] == rows
    assert doc["total"] == sum(counted.values()) and doc["backup"] == name
    sized = {i["name"]: i.get("bytes") for i in doc["items"]}
    assert sized["public.everything"] > 0  # its data as dumped
    for bad, status in [("backup_postgresql_20000101_000000.sql.gz", 404),
                        ("..%2F..%2Fetc%2Fpasswd", 400)]:
        resp = await api.get(f"/api/v1/targets/main/backups/{bad}/contents")
        assert resp.status == status, (bad, await resp.text())
    hostile = contents({"filename": name, "engine": "postgresql", "exact_count_kind": "rows",
                        "exact_counts": {"ok": 3, "neg": -1, "b": True, "\x00": 1,
                                         "x" * 600: 2, "s": "DROP"}})
    assert hostile["items"] == [{"name": "ok", "count": 3}, {"name": "neg", "count": None},
                                {"name": "b", "count": None}, {"name": "s", "count": None}]


async def test_jobs_filters(api: Any, worker: Any, pg_db: str) -> None:
    """Jobs can be filtered by target, status and kind."""
    job = await backup(api)
    body = await (await api.get("/api/v1/jobs?kind=backup&status=succeeded&target=main")
                  ).json()
    assert [j["id"] for j in body["jobs"]] == [job["id"]]
    body = await (await api.get("/api/v1/jobs?kind=restore")).json()
    assert body["jobs"] == []


async def test_stats(api: Any, worker: Any, pg_db: str) -> None:
    """Stats report server version, size and tables with row estimates — null, not 0, for
    a table never analysed, in /stats as in the manifest."""
    await pg.load_rich(pg_db)
    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE never_analysed (x int)")
    await conn.execute("INSERT INTO never_analysed SELECT generate_series(1, 10)")
    fresh = (await (await api.get("/api/v1/targets/main/stats")).json())["tables"]
    assert next(t for t in fresh if t["name"] == "never_analysed")["rows_estimate"] is None
    made = (await (await api.post("/api/v1/targets/main/backups?wait=60")).json())["result"]
    manifest = await (await api.get(f"/api/v1/targets/main/backups/{made['filename']}")).json()
    assert manifest["counts"]["public.never_analysed"] is None
    assert manifest["exact_counts"]['public.never_analysed'] == 10
    await conn.execute("ANALYZE")
    await conn.close()
    stats = await (await api.get("/api/v1/targets/main/stats")).json()
    assert stats["server_version"].startswith("15")
    assert stats["size_bytes"] > 0
    tables = {f"{t['schema']}.{t['name']}": t for t in stats["tables"]}
    assert tables["public.everything"]["rows_estimate"] == 2003
    assert tables["public.events"]["partitioned"] is True


async def test_unreachable_target_fails_clearly(api: Any, worker: Any, pg_db: str,
                                                settings: Any) -> None:
    """A backup of a database that does not exist fails with a clear, secret-free error."""
    await pg.drop_database(pg_db)
    job = await (await api.post("/api/v1/targets/main/backups?wait=30")).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "target_unreachable"
    assert pg_db in job["error"]["message"]
    assert pg.TEST_PASSWORD not in json.dumps(job)


async def test_audit_trail_records_requests_and_outcomes(api: Any, anon: Any, worker: Any,
                                                          pg_db: str, settings: Any) -> None:
    """Mutating requests (refused ones too) and job outcomes are audited; admins read them."""
    from tests.conftest import bearer

    job = await backup(api)
    await anon.post("/api/v1/targets/main/backups")  # no token: denied, still audited
    resp = await anon.get("/api/v1/audit", headers=bearer(settings, "operator"))
    assert resp.status == 403
    entries = (await (await api.get("/api/v1/audit?target=main")).json())["entries"]
    by_action = {(e["action"], e["result"]) for e in entries}
    assert ("create_backup", "ok") in by_action
    assert ("job.backup", "succeeded") in by_action
    denied = [e for e in entries if e["result"] == "denied"]
    assert denied and denied[0]["status"] == 401 and "subject" not in denied[0]
    outcome = next(e for e in entries if e["action"] == "job.backup")
    assert outcome["job"] == job["id"] and outcome["subject"] == "tester"
    assert outcome["backup"] == job["result"]["filename"]
    mine = (await (await api.get(f"/api/v1/audit?job={job['id']}")).json())["entries"]
    assert {e["action"] for e in mine} == {"create_backup", "job.backup"}
    # issue 22, item 10: "via" is the surface (not the token's client, safehold-cli for
    # every dev token); the job's outcome says the same
    assert {e["via"] for e in mine} == {"rest"} and mine[0]["client"] == "safehold-cli"
    for headers, via in (({"User-Agent": "curl/8.5.0"}, "rest"),
                         ({"User-Agent": "safehold-cli/0.1.0"}, "cli"),
                         ({"X-Safehold-Client": "web"}, "web")):
        job = await (await api.post("/api/v1/targets/main/backups?wait=60",
                                    headers=headers)).json()
        mine = (await (await api.get(f"/api/v1/audit?job={job['id']}")).json())["entries"]
        assert {e["action"]: e["via"] for e in mine} == {"create_backup": via,
                                                          "job.backup": via}, mine
    web = (await (await api.get("/api/v1/audit?via=web")).json())["entries"]
    assert web and all(e["via"] == "web" for e in web)


async def test_metrics(api: Any, anon: Any, worker: Any, pg_db: str, settings: Any,
                       aiohttp_client: Any, redis: Any) -> None:
    """/metrics exposes jobs, workers, backups and the last backup time; it can require a
    viewer token."""
    from dataclasses import replace

    from api.app import create_app
    from tests.conftest import bearer

    job = await backup(api)
    text = await (await anon.get("/metrics")).text()
    assert 'safehold_jobs_total{kind="backup",status="succeeded",target="main"} 1.0' in text
    assert "safehold_workers_alive 1.0" in text
    assert 'safehold_backups{target="main"} 1.0' in text
    assert f'safehold_backup_bytes{{target="main"}} {job["result"]["size_bytes"]}.0' in text
    assert 'safehold_last_backup_timestamp_seconds{target="main"}' in text
    assert 'safehold_job_duration_seconds_count{engine="postgresql",kind="backup"} 1.0' \
        in text
    assert f'safehold_backup_bytes_written_total{{target="main"}} ' \
        f'{job["result"]["size_bytes"]}.0' in text
    assert 'safehold_destination_backups{destination="local",target="main"} 1.0' in text
    assert 'safehold_destination_last_backup_size_bytes{destination="local",target="main"} ' \
        f'{job["result"]["size_bytes"]}.0' in text
    private = replace(settings, auth=replace(settings.auth, public_metrics=False))
    c = await aiohttp_client(create_app(private))
    assert (await c.get("/metrics")).status == 401
    assert (await c.get("/metrics", headers=bearer(private, "viewer"))).status == 200


async def test_without_a_worker_the_answer_says_so(api: Any, settings: Any) -> None:
    """No live worker: a REST submit is queued with a warning; the seed surface, which
    waits for the outcome, answers 503 at once and starts nothing."""
    resp = await api.post("/api/v1/targets/main/backups", json={})
    body = await resp.json()
    assert resp.status == 202 and "no live worker" in body["warnings"][0]
    resp = await api.post("/backup/create")
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "no_worker"
    jobs = (await (await api.get("/api/v1/jobs")).json())["jobs"]
    assert len(jobs) == 1  # only the REST one


async def test_jobs_and_audit_page_on_and_retention_previews(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, pg_db: str,
        test_env: dict[str, str]) -> None:
    """Issue 22, item 9 (what the page needs): jobs and audit come in pages (next_before,
    each entry once, in order); /retention says what a prune would delete now and why the
    rest stays — and deletes nothing."""
    from api.app import create_app
    from shared.config import parse_settings
    from tests.conftest import bearer, make_raw_config
    from tests.helpers import running_worker

    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["retention"] = {"keep_last": 2}
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        names = [(await backup(api))["result"]["filename"] for _ in range(4)]
    seen: list[str] = []
    query = "/api/v1/jobs?limit=3&kind=backup"
    while True:
        doc = await (await api.get(query)).json()
        seen += [j["id"] for j in doc["jobs"]]
        if "next_before" not in doc:
            break
        query = f"/api/v1/jobs?limit=3&kind=backup&before={doc['next_before']}"
    assert len(seen) == 4 == len(set(seen))
    created = [(await (await api.get(f"/api/v1/jobs/{i}")).json())["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)
    resp = await api.get("/api/v1/jobs?before=nope-nope")
    assert resp.status in (400, 404)

    ids: list[str] = []
    query = "/api/v1/audit?limit=2&action=job.backup"
    while True:
        doc = await (await api.get(query)).json()
        ids += [e["id"] for e in doc["entries"]]
        if "next_before" not in doc:
            break
        query = f"/api/v1/audit?limit=2&action=job.backup&before={doc['next_before']}"
    assert len(ids) == 4 == len(set(ids)) and ids == sorted(ids, reverse=True)
    for first in ("0-0", "0-1"):  # nothing before the stream's start (fuzzer-found 500)
        resp = await api.get(f"/api/v1/audit?before={first}")
        assert resp.status == 200 and (await resp.json())["entries"] == []
    for bad in ("", "0", "1-2-3", "1-2%0A"):
        for path in ("/api/v1/audit", "/api/v1/jobs"):
            resp = await api.get(f"{path}?before={bad}")
            assert resp.status == 400, (path, bad)
            assert (await resp.json())["error"]["code"] == "invalid_query"

    plan = await (await api.get("/api/v1/targets/main/retention")).json()
    local = plan["destinations"]["local"]
    assert plan["policy"] == {"keep_last": 2} and local["kept"] == 2
    assert sorted(d["filename"] for d in local["delete"]) == sorted(names[:2])
    assert all(d["reasons"] == ["no rule keeps it"] for d in local["delete"])
    assert len(list((tmp_path / "backups" / "main").glob("backup_*.gz"))) == 4  # none gone
    viewer = await aiohttp_client(create_app(settings), headers=bearer(settings, "viewer"))
    assert (await viewer.get("/api/v1/targets/main/retention")).status == 200
    assert (await viewer.get("/api/v1/targets/nope/retention")).status == 404


async def test_bodies_are_checked_by_the_route_tables_declaration(api: Any) -> None:
    """Issue 23: one declaration (Route.body) feeds both the OpenAPI document and the check
    of a request's body — no hand-kept copy to drift: each declared field is accepted by
    its handler, and what the schema forbids is a 400 naming the field."""
    from api.routes import ROUTES

    cases = [
        ("/api/v1/targets/main/backups", {"format": "xml"}, "field 'format' must be one of"),
        ("/api/v1/targets/main/backups", {"note": "x" * 501}, "longer than 500"),
        ("/api/v1/targets/main/backups", {"colour": "red"}, "unknown field(s): colour"),
        ("/api/v1/targets/main/restores", {}, "field 'backup' is required"),
        ("/api/v1/targets/main/restores", {"backup": "b", "roles": "everyone"},
         "field 'roles' must be one of"),
        ("/api/v1/targets/main/restores", {"backup": "b", "owner_map": {"a": 5}},
         "field 'owner_map' holds a value that has the wrong type"),
        ("/api/v1/targets/main/verify", {"identity": 5}, "field 'identity' has the wrong type"),
        ("/api/v1/targets/main/backups", {"compress": "yes"}, "field 'compress' has the wrong"),
    ]
    for path, body, says in cases:
        resp = await api.post(path, json=body)
        doc = await resp.json()
        assert resp.status == 400 and doc["error"]["code"] == "invalid_body", (body, doc)
        assert says in doc["error"]["message"], (body, doc)
    # every field a route declares gets past the body check (whatever the operation says)
    tried = 0
    for route in ROUTES:
        if route.body is None or route.method != "POST" or "{target}" not in route.path:
            continue
        for field, schema in route.body["properties"].items():
            value = schema.get("enum", [None])[0] if "enum" in schema else {
                "string": "x", "boolean": True, "object": {"a": "b"}}.get(schema.get("type"))
            resp = await api.post(route.path.replace("{target}", "main") + "?wait=0",
                                  json={"backup": "x", field: value} if "backup" in
                                  route.body["properties"] else {field: value})
            doc = await resp.json()
            assert "unknown field" not in str((doc.get("error") or {}).get("message")), \
                (route.path, field, doc)
            tried += 1
    assert tried >= 12  # backups, restores (every option), verify
