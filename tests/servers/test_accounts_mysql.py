"""Issue 21 (MySQL/MariaDB): with `globals = true` a backup carries the accounts that reach
its database — users with host patterns, a role, their logins, database, table, column and
routine grants, role grants and default roles. A restore on a new server (a private
mariadbd) needs an explicit choice, then gives the application its logins and exactly its
grants back; on the same server, grants revoked by mistake come back; nothing in a backup
can reach beyond its database."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomysql
import pymysql
import pytest

from api.app import create_app
from shared.config import Settings, parse_settings
from tests import my
from tests.conftest import bearer, make_raw_config
from tests.helpers import (
    form,
    publish_plain,
    readme_blocks,
    restore,
    run_recipe,
    running_worker,
    stored_manifest,
    wait_for,
)

MARIADBD = Path("/usr/sbin/mariadbd")


def names(db: str) -> dict[str, str]:
    tag = db[-8:]
    return {"rw": f"app_rw_{tag}", "ro": f"app_ro_{tag}", "role": f"app_readers_{tag}"}


def accounts_of(db: str) -> list[str]:
    n = names(db)
    return [f"`{n['rw']}`@`10.0.%`", f"`{n['ro']}`@`%`", f"`{n['role']}`"]


async def build(db: str) -> dict[str, str]:
    n = names(db)
    conn = await my.admin()
    try:
        await my.execute(
            conn, f"USE `{db}`",
            "CREATE TABLE orders (id INT PRIMARY KEY, total DECIMAL(9,2))",
            "CREATE TABLE customers (id INT PRIMARY KEY, name VARCHAR(50), card VARCHAR(20))",
            "INSERT INTO orders VALUES (1, 9.50), (2, 12.00)",
            "INSERT INTO customers VALUES (1, 'ann', '4111'), (2, 'bob', '5500')",
            "CREATE PROCEDURE bump() UPDATE orders SET total = total + 1",
            f"CREATE USER `{n['rw']}`@`10.0.%` IDENTIFIED BY 'rw-pw'",
            f"CREATE USER `{n['ro']}`@`%` IDENTIFIED BY 'ro-pw'",
            f"CREATE ROLE `{n['role']}`",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{db}`.* TO `{n['rw']}`@`10.0.%`",
            f"GRANT EXECUTE ON PROCEDURE `{db}`.`bump` TO `{n['rw']}`@`10.0.%`",
            f"GRANT PROCESS ON *.* TO `{n['rw']}`@`10.0.%`",  # server-wide: never carried
            f"GRANT SELECT ON `{db}`.`orders` TO `{n['role']}`",
            f"GRANT SELECT (`id`, `name`) ON `{db}`.`customers` TO `{n['ro']}`@`%` "
            "WITH GRANT OPTION",
            f"GRANT `{n['role']}` TO `{n['ro']}`@`%`",
            f"SET DEFAULT ROLE `{n['role']}` FOR `{n['ro']}`@`%`")
    finally:
        conn.close()
    return n


async def grants(conn: aiomysql.Connection, db: str, of: str = "") -> dict[str, Any]:
    """The logins and grants of the accounts of database `of` (default: `db`), with the
    database's name neutral. Database-level grants are compared by what they give: a
    grant on `my_db` (a pattern) and one on `my\\_db` (exactly it, as a restore writes
    it) give the same on that database, so their privileges are merged."""
    out: dict[str, Any] = {}
    for acc in accounts_of(of or db):
        try:
            rows = await my.execute(conn, f"SHOW GRANTS FOR {acc}")
        except pymysql.err.MySQLError:
            out[acc] = None
            continue
        lines, on_db = [], set()
        for (line,) in rows[0]:
            line = line.replace(f"`{db}`", "`DB`").replace(
                "`" + db.replace("_", "\\_") + "`", "`DB`")
            m = re.fullmatch(r"GRANT (.+) ON `DB`\.\* TO (\S+)", line)
            if m:
                on_db |= set(m[1].split(", "))
                continue
            lines.append(re.sub(  # a column list's order is the server's hash order
                r"\(([^)]*)\)", lambda m: "(" + ", ".join(sorted(m[1].split(", "))) + ")",
                line))
        if on_db:
            lines.append("ON DB: " + ", ".join(sorted(on_db)))
        out[acc] = sorted(lines)
    return out


@pytest.fixture
async def drop_accounts(my_db: str) -> AsyncIterator[None]:
    yield
    conn = await my.admin()
    try:
        for acc in accounts_of(my_db):
            with contextlib.suppress(pymysql.err.MySQLError):
                await my.execute(conn, f"DROP {'ROLE' if '@' not in acc else 'USER'} {acc}")
    finally:
        conn.close()


@pytest.fixture
async def my_db() -> AsyncIterator[str]:
    name = await my.create_database()
    yield name
    await my.drop_database(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def fresh_mariadb() -> AsyncIterator[int]:
    """A private MariaDB server (a new datadir on a free port): none of the accounts."""
    if not MARIADBD.exists() or not shutil.which("mariadb-install-db"):
        pytest.skip("the MariaDB server is needed (scripts/test.sh installs it)")
    d = Path(tempfile.mkdtemp(prefix="safehold-newmy-"))
    d.chmod(0o755)
    data = d / "data"
    data.mkdir()
    shutil.chown(data, "mysql")
    port = _free_port()
    init = await asyncio.create_subprocess_exec(
        "mariadb-install-db", "--user=mysql", f"--datadir={data}",
        "--auth-root-authentication-method=normal",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await init.wait() == 0
    server = await asyncio.create_subprocess_exec(
        str(MARIADBD), "--no-defaults", "--user=mysql", f"--datadir={data}", f"--port={port}",
        "--bind-address=127.0.0.1", f"--socket={data}/m.sock", f"--pid-file={data}/m.pid",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def up() -> bool:
        try:
            c = await aiomysql.connect(host="127.0.0.1", port=port, user="root",
                                       autocommit=True)
        except (OSError, pymysql.err.MySQLError):
            return False
        # install-db's anonymous accounts would shadow `user`@`%` logins from localhost
        await my.execute(c, "DELETE FROM mysql.global_priv WHERE User = ''",
                         "FLUSH PRIVILEGES", "CREATE DATABASE app")
        c.close()
        return True
    try:
        await wait_for(up, 30, "the private MariaDB")
        yield port
    finally:
        server.terminate()
        await server.wait()
        shutil.rmtree(d, ignore_errors=True)


def settings_for(prefix: str, tmp_path: Path, my_db: str, fresh: int | None) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "mysql", "globals": True,
                               "url": f"mysql://root@{my.HOST}:{my.PORT}/{my_db}"}}
    if fresh is not None:
        raw["targets"]["fresh"] = {"engine": "mysql",
                                   "url": f"mysql://root@127.0.0.1:{fresh}/app"}
    return parse_settings(raw, {}, base=tmp_path, source="<test>")


async def backup(api: Any) -> dict[str, Any]:
    job = await (await api.post("/api/v1/targets/main/backups?wait=60")).json()
    assert job["status"] == "succeeded", job
    return dict(job["result"])


def carry(tmp_path: Path, filename: str) -> None:
    src, dst = tmp_path / "backups" / "main", tmp_path / "backups" / "fresh"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (filename, f"{filename}.json"):
        shutil.copy2(src / f, dst / f)


async def what_ro_sees(port: int, db: str, user: str) -> dict[str, Any]:
    conn = await aiomysql.connect(host="127.0.0.1", port=port, user=user, password="ro-pw",
                                  db=db, autocommit=True)
    try:
        seen: dict[str, Any] = {
            "names": (await my.execute(conn, "SELECT GROUP_CONCAT(name ORDER BY id) "
                                             "FROM customers"))[0][0][0],
            "orders": (await my.execute(conn, "SELECT COUNT(*) FROM orders"))[0][0][0]}
        try:
            await my.execute(conn, "SELECT card FROM customers")
            seen["card"] = "readable"
        except pymysql.err.MySQLError:
            seen["card"] = "denied"
        return seen
    finally:
        conn.close()


async def test_a_new_server_gets_the_accounts_and_exactly_their_grants(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, my_db: str,
        drop_accounts: None, fresh_mariadb: int) -> None:
    n = await build(my_db)
    conn = await my.admin()
    before = await grants(conn, my_db)
    conn.close()
    settings = settings_for(prefix, tmp_path, my_db, fresh_mariadb)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        made = await backup(api)
        manifest = await (await api.get(
            f"/api/v1/targets/main/backups/{made['filename']}")).json()
        assert sorted(manifest["globals"]["accounts"]) == sorted(accounts_of(my_db))
        assert any("server-wide" in x for x in manifest["globals"]["left_out"])
        carry(tmp_path, made["filename"])
        refused = await restore(api, made["filename"], target="fresh",
                                create_safety_backup=False)
        assert refused["status"] == "failed", refused
        assert refused["error"]["code"] == "roles_missing", refused["error"]
        assert refused["error"]["database_state"] == "unchanged"
        assert n["ro"] in refused["error"]["message"]
        skipped = await restore(api, made["filename"], target="fresh", roles="skip",
                                create_safety_backup=False)
        assert skipped["status"] == "succeeded", skipped
        assert any("left out" in w for w in skipped["result"]["warnings"] or []), skipped
        new = await aiomysql.connect(host="127.0.0.1", port=fresh_mariadb, user="root",
                                     autocommit=True)
        try:
            assert all(v is None for v in (await grants(new, "app", my_db)).values())
            job = await restore(api, made["filename"], target="fresh", roles="create",
                                create_safety_backup=False)
            assert job["status"] == "succeeded", job
            assert any("created" in w and n["ro"] in w
                       for w in job["result"]["warnings"] or []), job
            after = await grants(new, "app", my_db)
        finally:
            new.close()
    # the same logins (password hashes), the same grants — but never the server-wide one
    expected = {acc: sorted(g.replace("GRANT PROCESS ON", "GRANT USAGE ON") for g in lines)
                for acc, lines in before.items()}
    assert after == expected, (after, expected)
    assert await what_ro_sees(fresh_mariadb, "app", n["ro"]) == {
        "names": "ann,bob", "orders": 2, "card": "denied"}


async def test_same_server_grants_revoked_by_mistake_come_back(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, my_db: str,
        drop_accounts: None) -> None:
    n = await build(my_db)
    conn = await my.admin()
    before = await grants(conn, my_db)
    settings = settings_for(prefix, tmp_path, my_db, None)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    try:
        async with running_worker(settings):
            name = (await backup(api))["filename"]
            await my.execute(
                conn, f"REVOKE SELECT, INSERT ON `{my_db}`.* FROM `{n['rw']}`@`10.0.%`",
                f"REVOKE SELECT (`name`) ON `{my_db}`.`customers` FROM `{n['ro']}`@`%`",
                f"REVOKE EXECUTE ON PROCEDURE `{my_db}`.`bump` FROM `{n['rw']}`@`10.0.%`")
            assert await grants(conn, my_db) != before
            for _ in range(2):  # over the live database, twice; no choice needed
                job = await restore(api, name)
                assert job["status"] == "succeeded", job
                assert await grants(conn, my_db) == before
            # the file, uploaded back (its accounts head before the dump's header), passes
            stored = (tmp_path / "backups" / "main" / name).read_bytes()
            # a head of many accounts: far past the first 4 KiB the header used to be in
            many = b"".join(f"-- G CREATE ROLE IF NOT EXISTS `r{i}`;\n".encode()
                            for i in range(3000))
            for blob in (stored, gzip.compress(many + gzip.decompress(stored))):
                up = await api.post("/api/v1/targets/main/uploads", data=form(blob))
                assert up.status == 201, await up.text()
            # a drill of that backup never gives grants on its scratch copy
            drill = await (await api.post("/api/v1/targets/main/verify?wait=120",
                                          json={})).json()
            assert drill["status"] == "succeeded", drill
            left = await my.execute(conn, "SELECT COUNT(*) FROM mysql.db WHERE Db LIKE "
                                          "'safehold\\_drill\\_%'")
            assert left[0][0][0] == 0
    finally:
        conn.close()


HOSTILE_HEADS = {
    "server-wide grant": "GRANT ALL PRIVILEGES ON *.* TO `{u}`@`%`;",
    "another database": "GRANT SELECT ON `mysql`.* TO `{u}`@`%`;",
    "a statement": "DROP DATABASE `{db}`;",
    "a setting": "SET GLOBAL general_log = 1;",
    "a plugin": "CREATE USER IF NOT EXISTS `{u}`@`%` IDENTIFIED VIA unix_socket;",
    "a file privilege": "GRANT FILE ON `{db}`.* TO `{u}`@`%`;",
    "every account": "GRANT SELECT ON `{db}`.* TO `PUBLIC`;",
    "a wildcard database": "GRANT SELECT ON `sh\\_%`.* TO `{u}`@`%`;",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADS))
async def test_a_hostile_head_changes_nothing(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, my_db: str,
        drop_accounts: None, case: str) -> None:
    """Placed in storage by hand (a correct checksum, a lying head): the restore is
    refused `unsafe_backup` before anything is sent; no account exists afterwards."""
    await build(my_db)
    intruder = f"intruder_{my_db[-8:]}"
    settings = settings_for(prefix, tmp_path, my_db, None)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    storage = tmp_path / "backups" / "main"
    async with running_worker(settings):
        good = (await backup(api))["filename"]
        manifest = await stored_manifest(storage, good)
        plain = gzip.decompress((storage / good).read_bytes())
        before = await my.fingerprint(my_db)
        head = (f"-- G CREATE USER IF NOT EXISTS `{intruder}`@`%` IDENTIFIED VIA "
                "mysql_native_password USING '*00';\n-- G "
                + HOSTILE_HEADS[case].format(u=intruder, db=my_db) + "\n")
        name = "upload_mysql_20200101_000000.sql.gz"
        await publish_plain(storage, name, head.encode() + plain, manifest)
        job = await restore(api, name, roles="create")
    err = job["error"]
    assert job["status"] == "failed" and err["code"] == "unsafe_backup", err
    assert err["database_state"] == "unchanged", err
    assert await my.fingerprint(my_db) == before
    conn = await my.admin()
    try:
        found = await my.execute(conn, "SELECT COUNT(*) FROM mysql.user WHERE User = "
                                       f"'{intruder}'")
        assert found[0][0][0] == 0
    finally:
        conn.close()


async def test_accounts_by_hand_on_a_new_server(
        aiohttp_client: Any, redis: Any, prefix: str, tmp_path: Path, my_db: str,
        drop_accounts: None, fresh_mariadb: int) -> None:
    """The README's MySQL recipe for a new server, as pasted (stock gunzip, mariadb, awk,
    sed), into a database of another name: the application logs in and reads exactly
    what it could."""
    from tests.support.recipes import fill

    n = await build(my_db)
    conn = await my.admin()
    before = await grants(conn, my_db)
    conn.close()
    settings = settings_for(prefix, tmp_path, my_db, None)
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        name = (await backup(api))["filename"]
    work = tmp_path / "by-hand"
    work.mkdir()
    shutil.copy2(tmp_path / "backups" / "main" / name, work / name)
    [recipe] = readme_blocks("Engines")
    await run_recipe(fill(recipe, F=name, DB="restored"), work, {
        **os.environ, "MYSQL_HOST": "127.0.0.1", "MYSQL_TCP_PORT": str(fresh_mariadb),
        "USER": "root"})
    new = await aiomysql.connect(host="127.0.0.1", port=fresh_mariadb, user="root",
                                 autocommit=True)
    try:
        after = await grants(new, "restored", my_db)
    finally:
        new.close()
    assert after == {acc: sorted(g.replace("GRANT PROCESS ON", "GRANT USAGE ON")
                                 for g in lines) for acc, lines in before.items()}
    assert await what_ro_sees(fresh_mariadb, "restored", n["ro"]) == {
        "names": "ann,bob", "orders": 2, "card": "denied"}
