"""MariaDB/MySQL helpers for tests: a password-protected role, fresh databases, a fingerprint."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import aiomysql

from shared.config import Settings, parse_settings

SOCKET = os.environ.get("SAFEHOLD_TEST_MYSQL_SOCKET", "/run/mysqld/mysqld.sock")
HOST = "127.0.0.1"
PORT = int(os.environ.get("SAFEHOLD_TEST_MYSQL_PORT", "3306"))
USER = "safehold_test"
PASSWORD = "My-S3cret\"Pw'7\\x"  # quotes and a backslash: the option file must escape them


async def admin() -> aiomysql.Connection:
    return await aiomysql.connect(unix_socket=SOCKET, user="root", charset="utf8mb4",
                                  autocommit=True)


async def execute(conn: aiomysql.Connection, *statements: str) -> list[Any]:
    out = []
    async with conn.cursor() as cur:
        for s in statements:
            await cur.execute(s)
            out.append(await cur.fetchall())
    return out


async def ensure_user() -> None:
    conn = await admin()
    try:
        for host in ("localhost", "127.0.0.1"):
            await execute(conn,
                          f"CREATE USER IF NOT EXISTS '{USER}'@'{host}'",
                          f"ALTER USER '{USER}'@'{host}' IDENTIFIED BY "
                          f"{conn.escape(PASSWORD)}",
                          f"GRANT ALL PRIVILEGES ON `sh\\_%`.* TO '{USER}'@'{host}'",
                          # restore drills create scratch databases
                          f"GRANT ALL PRIVILEGES ON `safehold\\_drill\\_%`.* TO "
                          f"'{USER}'@'{host}'")
    finally:
        conn.close()


async def create_database() -> str:
    name = f"sh_{uuid.uuid4().hex[:12]}"
    conn = await admin()
    try:
        await execute(conn, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 "
                            "COLLATE utf8mb4_unicode_ci")
    finally:
        conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await admin()
    try:
        await execute(conn, f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


async def user_conn(db: str) -> aiomysql.Connection:
    return await aiomysql.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, db=db,
                                  charset="utf8mb4", autocommit=True)


RICH = [
    """CREATE TABLE owner (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE)
       ENGINE=InnoDB AUTO_INCREMENT=1000""",
    """CREATE TABLE item (
         id BIGINT AUTO_INCREMENT PRIMARY KEY,
         owner_id INT NOT NULL,
         title VARCHAR(200) NOT NULL,
         body TEXT,
         emoji VARCHAR(20),
         data BLOB,
         price DECIMAL(20, 6),
         meta JSON,
         happened DATETIME(6),
         touched TIMESTAMP NOT NULL DEFAULT '2020-01-01 00:00:00',
         mood ENUM('sad', 'ok', 'happy'),
         tags SET('a', 'b', 'c'),
         price_x2 DECIMAL(21, 6) AS (price * 2) STORED,
         title_len INT AS (CHAR_LENGTH(title)) VIRTUAL,
         CONSTRAINT fk_owner FOREIGN KEY (owner_id) REFERENCES owner (id) ON DELETE CASCADE
       ) ENGINE=InnoDB""",
    "CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, what VARCHAR(100)) ENGINE=InnoDB",
    """INSERT INTO owner (name) VALUES ('anna'), ('bjørn'), ('周')""",
    """CREATE TRIGGER item_audit AFTER INSERT ON item FOR EACH ROW
       INSERT INTO audit (what) VALUES (CONCAT('item ', NEW.id))""",
    """INSERT INTO item (owner_id, title, body, emoji, data, price, meta, happened, mood, tags)
       SELECT 1000 + (seq % 3), CONCAT('title ', seq), REPEAT('ünïcode ', seq % 20),
              '🎉🙂', UNHEX(CONCAT('00FF00', LPAD(HEX(seq), 8, '0'), '0000')),
              seq * 1.123456, JSON_OBJECT('n', seq, 'list', JSON_ARRAY(1, 'two', NULL)),
              TIMESTAMP('2024-02-29 23:59:59.123456') - INTERVAL seq MINUTE,
              ELT(1 + seq % 3, 'sad', 'ok', 'happy'), 'a,c'
       FROM seq_1_to_700""",
    "DELETE FROM item WHERE id > 690",  # the auto-increment counter must stay past 700
    "CREATE VIEW happy_items AS SELECT id, title FROM item WHERE mood = 'happy'",
    """CREATE PROCEDURE add_owner(IN n VARCHAR(100)) BEGIN INSERT INTO owner (name) VALUES (n);
       END""",
    "CREATE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC RETURN x * 2",
    """CREATE EVENT nightly ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 00:00:00' DISABLE
       DO DELETE FROM audit WHERE id < 0""",
]


async def load_rich(db: str) -> None:
    conn = await user_conn(db)
    try:
        await execute(conn, *RICH)
    finally:
        conn.close()


async def fingerprint(db: str) -> dict[str, Any]:
    """Definitions (SHOW CREATE …), data checksums, and auto-increment counters."""
    conn = await admin()
    try:
        await execute(conn, f"USE `{db}`")
        out: dict[str, Any] = {}
        rows = (await execute(conn, "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema."
                                    f"TABLES WHERE TABLE_SCHEMA = '{db}' ORDER BY 1"))[0]
        for name, ttype in rows:
            if ttype == "VIEW":
                out[f"view {name}"] = (await execute(conn, f"SHOW CREATE VIEW `{name}`"))[0][0][1]
                continue
            out[f"table {name}"] = (await execute(conn, f"SHOW CREATE TABLE `{name}`"))[0][0][1]
            cols = [c[0] for c in (await execute(conn, f"SHOW COLUMNS FROM `{name}`"))[0]]
            concat = ", ".join(f"COALESCE(HEX(`{c}`), 'NULL')" for c in cols)
            data = (await execute(conn, f"SELECT COUNT(*), MD5(GROUP_CONCAT(MD5(CONCAT_WS('|', "
                                        f"{concat})) ORDER BY 1 SEPARATOR '')) FROM `{name}`"
                                  ))[0][0]
            out[f"data {name}"] = data
        for kind in ("PROCEDURE", "FUNCTION"):
            for (name,) in (await execute(conn, "SELECT ROUTINE_NAME FROM information_schema."
                                          f"ROUTINES WHERE ROUTINE_SCHEMA = '{db}' AND "
                                          f"ROUTINE_TYPE = '{kind}'"))[0]:
                out[f"{kind} {name}"] = (await execute(conn, f"SHOW CREATE {kind} `{name}`")
                                         )[0][0][2]
        for (name,) in (await execute(conn, "SELECT TRIGGER_NAME FROM information_schema."
                                      f"TRIGGERS WHERE TRIGGER_SCHEMA = '{db}'"))[0]:
            out[f"trigger {name}"] = (await execute(conn, f"SHOW CREATE TRIGGER `{name}`"))[0][0][2]
        for (name,) in (await execute(conn, "SELECT EVENT_NAME FROM information_schema.EVENTS "
                                      f"WHERE EVENT_SCHEMA = '{db}'"))[0]:
            out[f"event {name}"] = (await execute(conn, f"SHOW CREATE EVENT `{name}`"))[0][0][3]
    finally:
        conn.close()
    out["digest"] = hashlib.sha256(repr(sorted(out.items())).encode()).hexdigest()
    return out


PW_ENV = "SAFEHOLD_TEST_MY_PASSWORD"


def target_settings(prefix: str, tmp_path: Path, db: str) -> Settings:
    """Settings whose target `main` is MariaDB database `db`, reached as the test user."""
    from tests.conftest import make_raw_config

    raw = make_raw_config(prefix, tmp_path / "backups", None)
    raw["targets"] = {"main": {"engine": "mysql", "password_env": PW_ENV,
                               "url": f"mysql://{USER}@{HOST}:{PORT}/{db}"}}
    return parse_settings(raw, {PW_ENV: PASSWORD}, base=tmp_path, source="<test>")
