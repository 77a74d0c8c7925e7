"""The MySQL/MariaDB binlog archive (issue 26) against a private mariadbd per test
(tests/support/mariadb.py): what the server must allow (named fixes), binlog shipped
within seconds, byte for byte the server's own files, a backup recording its binlog
position (a base), the window read from archive and backups; one streamer per target, a
killed one's successor resuming with no gap; a binlog purged before it was archived
shown as a gap and notified."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.audit import AuditLog
from shared.binlog_window import window
from shared.config import Settings, parse_settings
from shared.errors import EngineError
from shared.keys import Keys
from shared.storage.catalog import Catalog
from tests.conftest import make_raw_config
from tests.servers.test_pitr_archive import streaming, wait_until
from tests.support.mariadb import REP_PW, Server, private_mariadb
from worker.engines import my_pitr
from worker.pitr import archive_of

pytestmark = pytest.mark.timeout(240)
PW_ENV = "SAFEHOLD_TEST_REP_PASSWORD"


@pytest.fixture
def server() -> Iterator[Server]:
    with private_mariadb() as s:
        s.sql("CREATE TABLE t (i int PRIMARY KEY, at datetime(6) DEFAULT NOW(6))", "app")
        s.sql("CREATE TABLE o (i int); INSERT INTO o VALUES (1), (2)", "other")
        yield s


def pitr_settings(prefix: str, tmp_path: Path, server: Server,
                  others: dict[str, Any] | None = None, **pitr: Any) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "mysql", "url": server.url(), "password_env": PW_ENV,
                               "pitr": {"enabled": True, "ship_interval": 0.3, **pitr}},
                      **(others or {})}
    return parse_settings(raw, {PW_ENV: REP_PW}, base=tmp_path, source="<test>")


@pytest.fixture
def settings(prefix: str, tmp_path: Path, server: Server, request: Any) -> Settings:
    # a test that needs more targets names them in `OTHER_TARGETS[test name]`
    others = OTHER_TARGETS.get(request.node.originalname)
    return pitr_settings(prefix, tmp_path, server, others(server) if others else None)


OTHER_TARGETS = {
    "test_restore_to_an_instant_into_another_target": lambda server: {
        "staging": {"engine": "mysql", "url": server.url(db="staging"),
                    "password_env": PW_ENV},
        "pg": {"engine": "postgresql", "url": "postgresql://x@127.0.0.1/none"}},
}


async def listings(settings: Settings) -> tuple[list[Any], list[Any]]:
    catalog = Catalog(settings)
    try:
        return (await catalog.list_backups(archive_of(settings.targets["main"]).id),
                await catalog.list_backups("main"))
    finally:
        await catalog.close()


async def archive_window(settings: Settings) -> dict[str, Any]:
    archive, backups = await listings(settings)
    return window(archive, backups, datetime.now(UTC))


async def window_past(api: Any, after: datetime, timeout: float = 30) -> dict[str, Any]:
    """The API's recovery window once its end is past `after`."""
    async def reached() -> dict[str, Any] | None:
        w = await (await api.get("/api/v1/targets/main/recovery-window")).json()
        return w if w["latest"] and w["latest"] >= after.isoformat()[:23] else None
    return dict(await wait_until(reached, timeout))


async def archive_past(settings: Settings, after: datetime, timeout: float = 30
                       ) -> dict[str, Any]:
    """The window read from the archive alone once its end is past `after`."""
    async def reached() -> dict[str, Any] | None:
        w = await archive_window(settings)
        return w if w["latest"] and w["latest"] >= after.isoformat()[:23] else None
    return dict(await wait_until(reached, timeout))


async def a_base_once_streaming(api: Any, redis: Redis, settings: Settings
                                ) -> dict[str, Any]:
    """Once the binlog streams: a backup taken (a base); its job."""
    await wait_until(lambda: is_streaming(redis, settings))
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    assert job["status"] == "succeeded", job.get("error")
    return dict(job)


async def state(redis: Redis, settings: Settings) -> dict[str, str]:
    raw = await redis.hgetall(Keys(settings.redis.prefix).pitr("main", "state"))  # type: ignore[misc]
    return {k.decode(): v.decode() for k, v in raw.items()}


async def is_streaming(redis: Redis, settings: Settings, who: str = "") -> bool:
    s = await state(redis, settings)
    return s.get("streamer", "").startswith(who) and bool(s.get("updated_at"))


def archived_bytes(tmp_path: Path) -> dict[int, bytes]:
    """Each binlog file as the archive holds it: its objects' plain bytes, in order."""
    stored = tmp_path / "backups" / "main.pitr"
    out: dict[int, bytearray] = {}
    docs = sorted((json.loads(p.read_text()) for p in stored.glob("*.json")),
                  key=lambda d: (d["number"], d["start"]))
    for doc in docs:
        plain = subprocess.run(["zstd", "-dc", str(stored / doc["filename"])],
                               capture_output=True, check=True).stdout
        have = out.setdefault(doc["number"], bytearray())
        assert doc["start"] == len(have), (doc["filename"], len(have))  # no hole, no overlap
        have += plain
    return {n: bytes(b) for n, b in out.items()}


def server_file(server: Server, number: int) -> bytes:
    """A binlog file as the server holds it; the file being written has its format
    description flagged "in use" (cleared when it is closed, as the stream sends it)."""
    data = bytearray((server.data / f"binlog.{number:06d}").read_bytes())
    data[21] &= ~1  # LOG_EVENT_BINLOG_IN_USE_F in the first event's flags
    return bytes(data)


async def test_what_the_server_must_allow_is_named(server: Server, tmp_path: Path,
                                                   prefix: str) -> None:
    server.sql("SET GLOBAL binlog_format = 'STATEMENT'; CREATE USER weak@'%' IDENTIFIED BY "
               f"'{REP_PW}'; GRANT ALL ON app.* TO weak@'%'")
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "mysql", "url": server.url("weak"),
                               "password_env": PW_ENV, "pitr": {"enabled": True}}}
    settings = parse_settings(raw, {PW_ENV: REP_PW}, base=tmp_path, source="<test>")
    with pytest.raises(EngineError) as caught:
        await my_pitr.preflight(settings.targets["main"])
    said = caught.value.message
    assert "binlog_format = 'ROW'" in said and "REPLICATION SLAVE, BINLOG MONITOR" in said
    # the exact statement: the account it logged in as, pasted as is
    assert "GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `weak`@`%`" in said, said
    assert caught.value.code == "pitr_not_ready"
    raw["targets"]["main"]["pitr"] = {"enabled": True, "slot": "x"}
    with pytest.raises(Exception, match="belong to PostgreSQL"):
        parse_settings(raw, {PW_ENV: REP_PW}, base=tmp_path, source="<test>")


async def test_binlog_is_archived_as_the_server_wrote_it_and_a_backup_is_a_base(
        server: Server, settings: Settings, redis: Redis, tmp_path: Path, api: Any,
        worker: Any) -> None:
    async with streaming(settings, redis):
        await wait_until(lambda: is_streaming(redis, settings))
        for i in range(30):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
        assert job["status"] == "succeeded", job.get("error")
        manifest = await (await api.get(
            f"/api/v1/targets/main/backups/{job['result']['filename']}")).json()
        server.sql("FLUSH BINARY LOGS")  # a complete file: stored whole
        for i in range(30, 60):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        last = datetime.now(UTC)
        w = await archive_past(settings, last, 30)
        got = await (await api.get("/api/v1/targets/main/recovery-window")).json()
        assert not (await state(redis, settings)).get("error")
    facts = manifest["binlog"]
    assert facts["file"] == "binlog.000001" and facts["position"] > 0, facts
    assert facts["gtid"] and facts["identity"] == "1:binlog"
    assert w["gaps"] == [], w
    [base] = w["bases"]
    assert base["usable"] and w["earliest"] == base["consistent_at"] <= w["latest"]
    assert got["earliest"] == w["earliest"] and got["streaming"]["streamer"]
    # byte for byte the server's own files: the first stored whole, the second in parts
    held = archived_bytes(tmp_path)
    assert held[1] == server_file(server, 1)
    assert server_file(server, 2).startswith(held[2]) and len(held[2]) > 4
    assert list((tmp_path / "backups" / "main.pitr").glob("binlog_mysql_*_00000001.binlog.zst"))
    # stock tools read it: mariadb-binlog decodes the archived file
    path = tmp_path / "binlog.000001"
    path.write_bytes(held[1])
    decoded = subprocess.run(["mariadb-binlog", "-v", str(path)], capture_output=True,
                             text=True, check=True).stdout
    assert "INSERT INTO `app`.`t`" in decoded


async def test_one_streamer_and_a_killed_ones_successor_leaves_no_gap(
        server: Server, settings: Settings, redis: Redis, tmp_path: Path) -> None:
    async with streaming(settings, redis, "w1"), streaming(settings, redis, "w2"):
        await wait_until(lambda: is_streaming(redis, settings))
        holder = (await state(redis, settings))["streamer"]
        for i in range(20):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        await asyncio.sleep(1.5)
        assert (await state(redis, settings))["streamer"] == holder  # never both
    # the holder is gone without a word (its lease lapses); writes go on meanwhile
    for i in range(20, 50):
        server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
    server.sql("FLUSH BINARY LOGS")
    server.sql("INSERT INTO t (i) VALUES (50)", "app")
    async with streaming(settings, redis, "w3"):
        await wait_until(lambda: is_streaming(redis, settings, "w3#"), 40)
        last = datetime.now(UTC)
        for i in range(51, 60):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        w = await archive_past(settings, last, 30)
    assert w["gaps"] == [], w
    held = archived_bytes(tmp_path)
    assert held[1] == server_file(server, 1)
    assert server_file(server, 2).startswith(held[2])
    fences = {json.loads(p.read_text())["fence"] for p in
              (tmp_path / "backups" / "main.pitr").glob("*.json")}
    assert len(fences) >= 2  # two holders shipped, one after the other


async def test_a_binlog_purged_before_it_was_archived_is_a_gap_shown_and_notified(
        server: Server, settings: Settings, redis: Redis, prefix: str) -> None:
    async with streaming(settings, redis):
        await wait_until(lambda: is_streaming(redis, settings))
        server.sql("INSERT INTO t (i) VALUES (1)", "app")

        async def shipped() -> bool:
            return bool((await archive_window(settings))["binlog"])
        await wait_until(shipped)
    for i in range(2, 40):  # binlog the archive never sees …
        server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        if i % 10 == 0:
            server.sql("FLUSH BINARY LOGS")
    current = server.sql("SHOW MASTER STATUS").split()[0]
    server.sql(f"PURGE BINARY LOGS TO '{current}'")  # … and the server no longer keeps
    async with streaming(settings, redis):
        async def gap_said() -> dict[str, str] | None:
            s = await state(redis, settings)
            return s if "gone from the server" in s.get("last_gap", "") else None
        said = await wait_until(gap_said, 30)
        server.sql("INSERT INTO t (i) VALUES (1000)", "app")

        async def two_stretches() -> dict[str, Any] | None:
            w = await archive_window(settings)
            return w if w["gaps"] and w["latest"] else None
        w = await wait_until(two_stretches, 20)
    assert "binlog.000001" in said["last_gap"]
    assert "replaced" in w["gaps"][0]["why"] or "purged" in w["gaps"][0]["why"], w["gaps"]
    audited = await AuditLog(redis, Keys(prefix)).query(action="pitr.gap")
    assert audited, "the gap is audited"


async def test_restore_to_an_instant_between_two_commits(
        server: Server, settings: Settings, redis: Redis, api: Any, worker: Any) -> None:
    """Writes every 20 ms, a TRUNCATE of another database among them, then the incident (a
    DROP TABLE): the restore to an instant brings back exactly the rows committed up to
    that second, through a base backup and the binlog after it replayed in a scratch
    server; the other database's TRUNCATE is left out of the replay (said), the live
    server's other database untouched; a safety backup first."""
    async with streaming(settings, redis):
        job = await a_base_once_streaming(api, redis, settings)
        deadline, i = time.monotonic() + 3.5, 0
        while time.monotonic() < deadline:
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
            if i == 40:  # written under `use app`: in the target's binlog, about `other`
                server.sql("TRUNCATE TABLE other.o", "app")
            i += 1
            await asyncio.sleep(0.02)
        rows = [line.split("\t") for line in server.sql(
            "SELECT i, FLOOR(UNIX_TIMESTAMP(at)) FROM t", "app").splitlines()]
        seconds = sorted({int(at) for _, at in rows})
        assert len(seconds) >= 3, seconds
        second = seconds[len(seconds) // 2]
        expected = {int(i) for i, at in rows if int(at) <= second}
        assert 0 < len(expected) < len(rows)
        server.sql("DROP TABLE t", "app")  # the incident
        after = datetime.now(UTC)
        await window_past(api, after, 30)
        when = datetime.fromtimestamp(second, UTC).isoformat().replace("+00:00", "Z")
        job = await (await api.post("/api/v1/targets/main/restores?wait=180", json={
            "point_in_time": when})).json()
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["safety_backup"]
    got = {int(v) for v in server.sql("SELECT i FROM t", "app").split()}
    assert got == expected, (len(got), len(expected))
    assert server.sql("SELECT COUNT(*) FROM o", "other") == "0"  # live: truncated, as it is
    said = " ".join(job["result"]["warnings"] or [])
    assert "other" in said and "left out" in said, said
    resp = await api.post("/api/v1/targets/main/restores", json={
        "point_in_time": "2020-01-01T00:00:00Z"})
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "outside_window"


async def test_a_drill_recovers_a_random_instant_in_scratch(
        server: Server, settings: Settings, redis: Redis, api: Any, worker: Any) -> None:
    """A PITR drill: a random instant of the window recovered (base + binlog in a scratch
    server), dumped, that dump restored into a scratch database and its counts compared;
    the RTO is recorded and the base shows its last drill; nothing of the drill stays."""
    async with streaming(settings, redis):
        job = await a_base_once_streaming(api, redis, settings)
        for i in range(20):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        after = datetime.now(UTC)
        await window_past(api, after, 30)
        job = await (await api.post("/api/v1/targets/main/verify?wait=180", json={
            "point_in_time": "random"})).json()
        assert job["status"] == "succeeded", job.get("error")
        w = await (await api.get("/api/v1/targets/main/recovery-window")).json()
    record = job["result"]
    assert record["mode"] == "pitr-scratch-recovery" and record["rto_s"] > 0
    assert record["outcome"] == "passed", record
    [base] = w["bases"]
    assert base["last_drill"]["outcome"] == "passed"
    backups = await (await api.get("/api/v1/targets/main/backups")).json()
    assert [b["filename"] for b in backups["backups"]] == [base["filename"]]
    assert server.sql("SHOW DATABASES LIKE 'safehold%'") == ""  # no scratch left here


async def test_lagging_binlog_is_alarmed(server: Server, prefix: str, tmp_path: Path,
                                         redis: Redis) -> None:
    """The archive cannot be written (its directory replaced by a file) while the server
    writes 20 MiB of binlog: pitr.lagging is notified and audited once; back, it catches
    up with no gap."""
    settings = pitr_settings(prefix, tmp_path, server, lag_alarm_mb=16)
    archive = tmp_path / "backups" / "main.pitr"
    async with streaming(settings, redis):
        await wait_until(lambda: is_streaming(redis, settings))
        server.sql("INSERT INTO t (i) VALUES (1)", "app")
        async def shipped() -> bool:
            return bool((await archive_window(settings))["binlog"])
        await wait_until(shipped, 20)
        away = archive.with_name("main.pitr.away")
        archive.rename(away)
        archive.write_text("not a directory")
        server.sql("CREATE TABLE big (b longblob); INSERT INTO big SELECT REPEAT('x', 1 << 20)"
                   " FROM seq_1_to_20", "app")
        during = datetime.now(UTC)

        async def lagging() -> list[dict[str, object]]:
            return await AuditLog(redis, Keys(prefix)).query(action="pitr.lagging")
        alerts = await wait_until(lagging, 60)
        archive.unlink()
        away.rename(archive)
        w = await archive_past(settings, during, 60)
    assert w["gaps"] == [] and len(await lagging()) == 1
    assert "MiB of binlog" in str(alerts[0]["detail"])


async def test_restore_up_to_a_binlog_position_beside_the_live_database(
        server: Server, settings: Settings, redis: Redis, api: Any, worker: Any) -> None:
    """The operator found where the DROP TABLE starts (SHOW MASTER STATUS just before it,
    or mariadb-binlog's `# at`): a restore up to that position, into a new database beside
    the live one, holds every row written before it; the live database is untouched.
    Positions outside the archived binlog are refused before any job."""
    server.sql("GRANT ALL ON app_before.* TO rep@'%'")
    async with streaming(settings, redis):
        job = await a_base_once_streaming(api, redis, settings)
        for i in range(30):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        file, pos = server.sql("SHOW MASTER STATUS").split()[:2]
        server.sql("DROP TABLE t", "app")  # the incident starts at `pos`
        server.sql("CREATE TABLE t (i int PRIMARY KEY, at datetime(6))", "app")
        after = datetime.now(UTC)
        await window_past(api, after, 30)
        job = await (await api.post("/api/v1/targets/main/restores?wait=180", json={
            "point_in_time": f"{file}:{pos}", "into_database": "app_before"})).json()
        for bad in (f"{file}:3", "binlog.000099:100", "binlog.1:4"):
            resp = await api.post("/api/v1/targets/main/restores", json={
                "point_in_time": bad})
            assert resp.status in (400, 422), (bad, await resp.text())
    try:
        assert job["status"] == "succeeded", job.get("error")
        got = {int(v) for v in server.sql("SELECT i FROM t", "app_before").split()}
        assert got == set(range(30))
        assert server.sql("SELECT COUNT(*) FROM t", "app") == "0"  # live: as it is
    finally:
        server.sql("DROP DATABASE IF EXISTS app_before")


async def test_a_reset_binlog_starts_a_new_stretch(
        server: Server, settings: Settings, redis: Redis) -> None:
    """RESET MASTER makes binlog.000001 again, with more bytes than the archive held of the
    old one: the streamer sees the file's creation stamp changed, says so as a gap, and a
    new stretch of archive starts from the new files — never spliced onto the old."""
    async with streaming(settings, redis):
        await wait_until(lambda: is_streaming(redis, settings))
        server.sql("INSERT INTO t (i) VALUES (1)", "app")

        async def shipped() -> bool:
            return bool((await archive_window(settings))["binlog"])
        await wait_until(shipped)
    await asyncio.sleep(1.1)  # the new file's creation stamp is another second
    server.sql("RESET MASTER")
    for i in range(2, 60):
        server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
    async with streaming(settings, redis):
        async def gap_said() -> dict[str, str] | None:
            s = await state(redis, settings)
            return s if "reset" in s.get("last_gap", "") else None
        await wait_until(gap_said, 40)
        server.sql("INSERT INTO t (i) VALUES (1000)", "app")

        async def new_stretch() -> dict[str, Any] | None:
            w = await archive_window(settings)
            return w if w["gaps"] and w["latest"] else None
        w = await wait_until(new_stretch, 30)
    assert "reset" in w["gaps"][0]["why"], w["gaps"]


async def test_the_replay_account_of_the_scratch_server_is_walled_in(tmp_path: Path) -> None:
    """Whatever a binlog statement the check let pass turns out to do, it runs as an
    account with rights on the target's database and BINLOG REPLAY only: no global
    setting (the general log is a file), no file read or written, no other database, no
    plugin; no routine of the base runs as a superuser (its DEFINER root keeps rights on
    the target's database only); the server itself has no network and no symbolic links."""
    import aiomysql
    import pymysql

    from shared.config import TargetConfig
    from worker.engines.my_connection import connect, query
    from worker.engines.my_scratch import scratch_server
    from worker.procedures.pitr_mysql import BinlogPitr

    async with scratch_server() as url:
        root = TargetConfig(id="scratch", engine="mysql", url=url.replace("{database}", ""))
        async with connect(root) as conn:
            await query(conn, "CREATE DATABASE app")
            (skip_net, links), = await query(conn, "SELECT @@skip_networking, "
                                                   "@@have_symlink")
        assert skip_net == 1 and links in ("DISABLED", b"DISABLED")
        scratch = TargetConfig(id="scratch", engine="mysql",
                               url=url.replace("{database}", "app"))
        async with connect(scratch) as conn:  # a base whose routine runs as root
            await query(conn, "CREATE DEFINER=root@localhost PROCEDURE app.loud() "
                              "SET GLOBAL general_log = 1")
            await query(conn, "CREATE DEFINER=root@localhost VIEW app.v AS SELECT 1 AS one")
        replayer, dumper = await BinlogPitr._lock_down(scratch, "app")
        assert "safehold_replay_" in replayer.url and "safehold_admin_" in dumper.url
        async with connect(replayer) as conn:
            # root's routine runs with root's rights on the target's database only now
            with pytest.raises((pymysql.err.MySQLError, aiomysql.Error)):
                await query(conn, "CALL loud()")
            assert (await query(conn, "SELECT one FROM v"))[0][0] == 1  # its views work
            assert (await query(conn, "SELECT @@general_log"))[0][0] == 0
            await query(conn, "CREATE TABLE t (a int)")  # its database: every right
            assert (await query(conn, "SELECT LOAD_FILE('/etc/passwd')"))[0][0] is None
            for refused in ("SET GLOBAL general_log_file = '/tmp/x'",
                            "SET GLOBAL general_log = 1",
                            "CREATE DATABASE other",
                            "SELECT 1 INTO OUTFILE '/tmp/safehold-replay-test'",
                            "INSTALL SONAME 'ha_example'"):
                with pytest.raises((pymysql.err.MySQLError, aiomysql.Error)):
                    await query(conn, refused)
            # symbolic links off: a DATA DIRECTORY is ignored, the table stays inside
            await query(conn, "CREATE TABLE t2 (a int) DATA DIRECTORY = '/tmp'")
            (_, ddl), = await query(conn, "SHOW CREATE TABLE t2")
            assert "DIRECTORY" not in str(ddl)
    assert not Path("/tmp/safehold-replay-test").exists()


async def test_restore_through_a_gtid_and_a_gtid_domain_change_is_shown(
        server: Server, settings: Settings, redis: Redis, api: Any, worker: Any) -> None:
    """The operator names the last good transaction by its GTID (`gtid:0-1-N`, as
    mariadb-binlog prints it): the restore replays through its commit and nothing after
    (the DROP TABLE right after it is left out). A later transaction in another GTID
    domain (gtid_domain_id changed) is shown in the window with the gaps — the binlog goes
    on there, so recovery does too — and notified once. A GTID the archive has not reached,
    one before every base, a list or junk are refused before any job."""
    server.sql("GRANT ALL ON app_before.* TO rep@'%'")
    async with streaming(settings, redis):
        job = await a_base_once_streaming(api, redis, settings)
        for i in range(30):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        good = server.sql("SELECT @@gtid_binlog_pos")  # the 30th insert's GTID
        server.sql("DROP TABLE t", "app")
        server.sql("CREATE TABLE t (i int PRIMARY KEY, at datetime(6))", "app")
        server.sql("SET SESSION gtid_domain_id = 5; INSERT INTO t (i) VALUES (99)", "app")
        after = datetime.now(UTC)
        w = await window_past(api, after, 30)
        said = await state(redis, settings)
        job = await (await api.post("/api/v1/targets/main/restores?wait=180", json={
            "point_in_time": f"gtid:{good}", "into_database": "app_before"})).json()
        domain, server_id, seq = map(int, good.split("-"))
        for bad, status in ((f"gtid:{domain}-{server_id}-{seq + 1000}", 422),
                            (f"gtid:{domain}-{server_id}-1", 422), ("gtid:7-1-1", 422),
                            (f"gtid:{good},5-1-1", 400), ("gtid:x", 400),
                            ("gtid:1-1-99999999999999999999999", 400)):
            resp = await api.post("/api/v1/targets/main/restores", json={
                "point_in_time": bad})
            assert resp.status == status, (bad, await resp.text())
    try:
        assert job["status"] == "succeeded", job.get("error")
        got = {int(v) for v in server.sql("SELECT i FROM t", "app_before").split()}
        assert got == set(range(30))
        assert server.sql("SELECT i FROM t", "app") == "99"  # live: as it is
    finally:
        server.sql("DROP DATABASE IF EXISTS app_before")
    changes = [g for g in w["gaps"] if g["continuous"]]
    assert len(changes) == 1 and "GTID domain 5 begins" in changes[0]["why"], w["gaps"]
    assert not [g for g in w["gaps"] if not g["continuous"]], w["gaps"]
    assert w["gtid"]["to"].startswith(f"{domain}-{server_id}-") and ",5-1-" in w["gtid"]["to"]
    assert "GTID domain 5 begins" in said.get("last_gap", ""), said
    audited = await AuditLog(redis, Keys(settings.redis.prefix)).query(action="pitr.gap")
    assert len(audited) == 1 and "GTID domain 5" in str(audited[0]["detail"]), audited
    assert w["earliest"] and w["bases"][0]["usable"]


async def test_restore_to_an_instant_over_the_live_database_twice_then_one_table(
        server: Server, settings: Settings, redis: Redis, api: Any, worker: Any) -> None:
    """An unlucky operator restores to T over the live database, then again to the same T
    (the first restore's own load is in the binlog now: it must change nothing), then —
    after more writes — only table `t` to T: `t` is as it was at T again, `u` keeps what
    was written since."""
    server.sql("CREATE TABLE u (k int PRIMARY KEY, v varchar(20))", "app")

    def fingerprint() -> str:
        return server.sql("SELECT i FROM t ORDER BY i; SELECT k, v FROM u ORDER BY k", "app")

    async def restore(**body: Any) -> dict[str, Any]:
        job = await (await api.post("/api/v1/targets/main/restores?wait=180", json=body)
                     ).json()
        assert job.get("status") == "succeeded", job
        return dict(job["result"])

    async with streaming(settings, redis):
        await a_base_once_streaming(api, redis, settings)
        await asyncio.sleep(1.1)  # T (whole seconds) after the base's snapshot
        for i in range(20):
            server.sql(f"INSERT INTO t (i) VALUES ({i}); INSERT INTO u VALUES ({i}, 'v{i}')",
                       "app")
        await asyncio.sleep(1.1)
        at_t = fingerprint()
        when = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        await asyncio.sleep(1.1)
        server.sql("DELETE FROM t WHERE i < 10; UPDATE u SET v = 'damaged'", "app")
        await window_past(api, datetime.now(UTC))
        point = when.isoformat().replace("+00:00", "Z")
        first = await restore(point_in_time=point)
        assert fingerprint() == at_t and first["safety_backup"]
        second = await restore(point_in_time=point)
        assert fingerprint() == at_t and second["safety_backup"] != first["safety_backup"]
        server.sql("INSERT INTO t (i) VALUES (500); INSERT INTO u VALUES (500, 'later')",
                   "app")
        await window_past(api, datetime.now(UTC))
        scoped = await restore(point_in_time=point, tables=["t"])
    assert scoped["safety_backup"]
    assert server.sql("SELECT GROUP_CONCAT(i ORDER BY i) FROM t", "app") == \
        ",".join(map(str, range(20)))
    assert server.sql("SELECT v FROM u WHERE k = 500", "app") == "later"
    assert server.sql("SELECT COUNT(*) FROM u", "app") == "21"


async def test_big_events_and_small_parts_are_archived_byte_for_byte(
        server: Server, settings: Settings, redis: Redis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Shipments are read back from the spool in pieces, never whole: a 12 MiB row event
    (one LONGBLOB value) larger than a part, many small events cut into 1 MiB parts, a
    tick's budget of 3 MiB — the archive is still the server's files byte for byte."""
    from worker import binlog_archive

    monkeypatch.setattr(binlog_archive, "PART_MAX", 1 << 20)
    monkeypatch.setattr(binlog_archive, "READ_MAX", 3 << 20)
    server.sql("SET GLOBAL max_allowed_packet = 64 * 1024 * 1024")
    server.sql("CREATE TABLE blobs (k int PRIMARY KEY, b longblob)", "app")
    async with streaming(settings, redis):
        await wait_until(lambda: is_streaming(redis, settings))
        server.sql("INSERT INTO blobs VALUES (1, REPEAT('b', 12 * 1024 * 1024))", "app")
        for n in range(4):
            server.sql(f"INSERT INTO t (i) SELECT seq FROM seq_{n * 20000 + 1}_to_"
                       f"{(n + 1) * 20000}", "app")
        last = datetime.now(UTC)
        w = await archive_past(settings, last, 60)
    assert w["gaps"] == [], w
    held = archived_bytes(tmp_path)
    assert server_file(server, 1).startswith(held[1]) and len(held[1]) > 12 << 20
    sizes = [json.loads(p.read_text())["raw_bytes"]
             for p in (tmp_path / "backups" / "main.pitr").glob("binlogpart_*.json")]
    assert max(sizes) > 12 << 20 and len([n for n in sizes if n <= 1 << 20]) >= 2, sizes


async def test_restore_to_an_instant_into_another_target(
        server: Server, settings: Settings, redis: Redis, api: Any, worker: Any) -> None:
    """prod -> staging as prod was at T: the state at T of `main` (base + binlog replayed
    in scratch) loaded into target `staging` — its lock, its credentials, its safety
    backup — while `main` is not touched; the audit entry is under `staging`. Another
    engine's target, or with into_database, is refused before any job."""
    server.sql("CREATE DATABASE staging; GRANT ALL ON staging.* TO rep@'%'")
    server.sql("CREATE TABLE t (i int PRIMARY KEY, at datetime(6)); INSERT INTO t (i) "
               "VALUES (-1)", "staging")
    async with streaming(settings, redis):
        job = await a_base_once_streaming(api, redis, settings)
        for i in range(10):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        at_t = server.sql("SELECT GROUP_CONCAT(i ORDER BY i) FROM t", "app")
        file, pos = server.sql("SHOW MASTER STATUS").split()[:2]
        server.sql("DELETE FROM t WHERE i < 5", "app")
        after = datetime.now(UTC)
        await window_past(api, after, 30)
        live = server.sql("SELECT GROUP_CONCAT(i ORDER BY i) FROM t", "app")
        job = await (await api.post("/api/v1/targets/main/restores?wait=180", json={
            "point_in_time": f"{file}:{pos}", "into_target": "staging"})).json()
        for bad in ({"into_target": "pg"}, {"into_target": "staging", "into_database": "x"},
                    {"into_target": "nope"}):
            resp = await api.post("/api/v1/targets/main/restores", json={
                "point_in_time": "latest", **bad})
            assert resp.status in (404, 422), (bad, await resp.text())
    assert job["status"] == "succeeded", job.get("error")
    assert job["target"] == "staging" and job["result"]["safety_backup"], job
    assert server.sql("SELECT GROUP_CONCAT(i ORDER BY i) FROM t", "staging") == at_t
    assert server.sql("SELECT GROUP_CONCAT(i ORDER BY i) FROM t", "app") == live
    audit = await (await api.get("/api/v1/audit?action=create_restore")).json()
    said = [(e.get("backup"), e.get("target")) for e in audit["entries"]]
    assert (f"point in time {file}:{pos} from target main into target staging",
            "staging") in said, said


async def test_an_idle_servers_window_goes_on_to_now(
        server: Server, settings: Settings, redis: Redis, api: Any, worker: Any) -> None:
    """An idle server writes no binlog, so no shipment says the archive is still complete
    later on: the streamer's word (its Redis state: the end it shipped, the last instant
    the server had written nothing past it) carries the window on, and an instant in the
    quiet time after the last write restores."""
    server.sql("GRANT ALL ON app_quiet.* TO rep@'%'")
    async with streaming(settings, redis):
        job = await a_base_once_streaming(api, redis, settings)
        for i in range(5):
            server.sql(f"INSERT INTO t (i) VALUES ({i})", "app")
        quiet = datetime.now(UTC) + timedelta(seconds=1.5)

        async def on_to_quiet() -> dict[str, Any] | None:
            w = await (await api.get("/api/v1/targets/main/recovery-window")).json()
            return w if w["latest"] and w["latest"] >= (
                quiet + timedelta(seconds=1)).isoformat()[:23] else None
        w = await wait_until(on_to_quiet, 30)
        stored = await archive_window(settings)  # the manifests alone end at the last write
        assert stored["latest"] < quiet.isoformat()[:23] <= w["latest"], (stored, w)
        job = await (await api.post("/api/v1/targets/main/restores?wait=180", json={
            "point_in_time": quiet.isoformat(), "into_database": "app_quiet"})).json()
    try:
        assert job["status"] == "succeeded", job.get("error")
        assert server.sql("SELECT GROUP_CONCAT(i ORDER BY i) FROM t", "app_quiet") == \
            "0,1,2,3,4"
    finally:
        server.sql("DROP DATABASE IF EXISTS app_quiet")
