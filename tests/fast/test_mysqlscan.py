"""The MySQL file check finds every statement as the mysql client splits them (quotes,
backticks, comments, executable comments, DELIMITER), whatever the chunking: a statement
hidden after another on one line, or inside an executable comment, is refused; what
mysqldump writes (strings full of `;`, routines between `DELIMITER ;;`) passes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import BadRequest
from shared.formats.mysql import validate_mysql
from shared.formats.mysqlscan import StatementStarts

HEADER = b"-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB\n"
FOOTER = b"\n-- Dump completed on 2026-12-06 19:00:00\n"
DUMPLIKE = (
    b"/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;\n"
    b"/*M!999999\\- enable the sandbox mode */ \n"
    b"DROP TABLE IF EXISTS `t`;\nCREATE TABLE `t` (`a` text) ENGINE=InnoDB;\n"
    b"INSERT INTO `t` VALUES ('x; GRANT ALL ON *.* TO y'),('it\\'s; DROP DATABASE z'),"
    b"(\"q;\"),('-- not a comment; KILL 1'),('/* ; */');\n"
    b"DELIMITER ;;\n/*!50003 CREATE*/ /*!50017 DEFINER=`root`@`localhost`*/ /*!50003 TRIGGER "
    b"tr BEFORE INSERT ON t FOR EACH ROW BEGIN SET NEW.a = 'b'; END */;;\nDELIMITER ;\n"
    b"DELIMITER ;;\nCREATE DEFINER=`root`@`localhost` PROCEDURE `p`()\nBEGIN\n"
    b"  SELECT 1; GRANT SELECT ON x.* TO y;\nEND ;;\nDELIMITER ;\n"
    b"# a hash comment; GRANT\n/* a block; GRANT */\n"
    b"/*!40101 SET SQL_MODE=@OLD_SQL_MODE */;\n")


def statements(data: bytes, step: int) -> list[tuple[bytes, int]]:
    out: list[tuple[bytes, int]] = []
    scan = StatementStarts(lambda head, line: out.append((head[:30], line)))
    for i in range(0, len(data), step):
        scan.feed(data[i:i + step])
    scan.finish()
    return out


def test_the_same_statements_whatever_the_chunking() -> None:
    whole = statements(DUMPLIKE, len(DUMPLIKE))
    assert [h.split()[0] for h, _ in whole] == [
        b"SET", b"DROP", b"CREATE", b"INSERT", b"CREATE*/", b"CREATE", b"SET"]
    for step in (1, 2, 3, 5, 17, 64):
        assert statements(DUMPLIKE, step) == whole


def test_what_mysqldump_writes_passes() -> None:
    assert validate_mysql(iter([HEADER, DUMPLIKE, FOOTER]))["raw_bytes"] > 0


@pytest.mark.parametrize("hidden, line", [
    (b"SELECT 1; GRANT ALL ON *.* TO x@y;\n", 2),
    (b"INSERT INTO t VALUES ('a');  SET GLOBAL general_log = 1;\n", 2),
    (b"/*!50000 SELECT 1; CREATE USER x IDENTIFIED BY 'p' */;\n", 2),
    (b"SELECT 'a\\';'; DROP DATABASE mysql;\n", 2),
    (b"DELIMITER $$\nSELECT 1$$ CALL mysql.evil()$$\n", 3),
    (b"SET @s = 'x'; PREPARE s FROM @s;\n", 2),
    (b"/* a */ KILL 1;\n", 2),
    (b"/*M!999999\\- enable the sandbox mode */ GRANT ALL ON *.* TO x;\n", 2),
    # where the client and the server would read the text apart (an attack review's list)
    (b"SELECT 1 /*!999999 ' */; GRANT ALL ON *.* TO x; SELECT 2 /*!999999 ' */;\n", 2),
    (b"SELECT 1 --\x01 '\n; GRANT ALL ON *.* TO x --\x01 '\n;\n", 2),
    (b"SELECT 1; --\x0b '\nSELECT 2; GRANT ALL ON *.* TO x; -- '\n", 2),
    (b"--x '\nSELECT 1; GRANT ALL ON *.* TO x; -- '\n", 2),
    (b"SET sql_mode=1048576;\nSELECT '\\'; GRANT ALL ON *.* TO x; # '\n", 2),
    (b"SET sql_mode=CONCAT('NO_BACKSLASH','_ESCAPES');\n", 2),
    (b"/*!40101 SET SQL_MODE='ANSI_QUOTES' */;\n", 2),
    (b"/*!40101 SET NAMES gbk */;\nSELECT '\x81\\'; GRANT ALL ON *.* TO x; # '\n", 2),
    (b"SELECT 1; \\C gbk\n", 2),
    (b'DELIMITER "$$"\nSELECT 1$$ GRANT ALL ON *.* TO x$$\n', 3),
    (b"DELIMITER $$ x\nSELECT 1$$ GRANT ALL ON *.* TO x$$\n", 3),
    (b"/*!999999 DELIMITER $$*/\nSELECT 1; GRANT ALL ON *.* TO x;\n", 2),
    (b"SELECT 1 /*M!999999 ' */; GRANT ALL ON *.* TO x;\n", 2),
    (b"# " + b"x" * 300 + b"\nDELIMITER $$\nSELECT 1$$ GRANT ALL ON *.* TO x$$\n", 4),
    (b"SET @OLD_SQL_MODE=1048576;\nSET SQL_MODE=@OLD_SQL_MODE;\n", 2),
    (b"SET @saved_cs_client='gbk'; SET character_set_client=@saved_cs_client;\n", 2),
    (b"INSERT INTO mysql.global_priv VALUES ('%','x','{}');\n", 2),
    (b"DROP TABLE IF EXISTS `mysql` . `user`;\n", 2),
    # what a deny-list misses (a third review): only mysqldump's statements are allowed
    (b"DELIMITER ;;\nBEGIN NOT ATOMIC CREATE OR REPLACE USER x@y; END ;;\nDELIMITER ;\n", 3),
    (b"CREATE OR REPLACE USER x@localhost IDENTIFIED BY 'x';\n", 2),
    (b"CREATE/**/USER x@localhost;\n", 2),
    (b"CREATE OR REPLACE SERVER s FOREIGN DATA WRAPPER mysql OPTIONS (HOST 'h');\n", 2),
    (b"SET STATEMENT max_statement_time=100 FOR GRANT SELECT ON *.* TO x;\n", 2),
    (b"SET autocommit=1, GLOBAL max_connections=4242;\n", 2),
    (b"SET/**/GLOBAL event_scheduler=ON;\n", 2),
    (b"CREATE TABLE other_db.t (a int);\n", 2),
    (b"INSERT INTO" + b" " * 300 + b"mysql.global_priv VALUES (1);\n", 2),
    (b"INSERT INTO mysql/**/.global_priv VALUES (1);\n", 2),
    (b"SELECT f();\n", 2),
    (b"DO SLEEP(1);\n", 2),
    (b"CREATE TABLE `t` (a int);\nDELIMITER ;;\n/*!50003 CREATE*/ /*!50017 DEFINER=`root`@"
     b"`localhost`*/ /*!50003 TRIGGER tr BEFORE INSERT ON `t` FOR EACH ROW SET NEW.a = 1 */;;"
     b"\nDELIMITER ;\nINSERT INTO `t` VALUES (1);\n", 6),
    (b"SET sql_mode = 'NO_BACKSLASH_ESCAPES';\n", 2),
])
def test_a_hidden_statement_is_refused(hidden: bytes, line: int) -> None:
    with pytest.raises(BadRequest) as err:
        validate_mysql(iter([HEADER, hidden, FOOTER]))
    assert err.value.code == "unsafe_backup" and f"line {line}:" in err.value.message, \
        err.value.message
    for step in (1, 3, 16):  # any chunking
        with pytest.raises(BadRequest):
            validate_mysql(iter([HEADER] + [hidden[i:i + step]
                                            for i in range(0, len(hidden), step)] + [FOOTER]))


PIECES = [b"a", b" ", b"\n", b";", b"'", b'"', b"`", b"\\", b"-", b"--", b"-- ", b"#", b"/*",
          b"*/", b"/*!50000 ", b"GRANT", b"DELIMITER ;;\n", b"DELIMITER ;\n", b";;", b"x"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=60), st.integers(1, 13))
def test_chunking_never_changes_what_is_found(pieces: list[bytes], step: int) -> None:
    data = b"".join(pieces)

    def outcome(step: int) -> object:
        try:
            return statements(data, step)
        except ValueError:
            return "refused"
    assert outcome(step) == outcome(max(1, len(data)))


@pytest.mark.parametrize("padded", [
    b"DROP TABLE IF EXISTS `t`" + b" " * 300 + b", `mysql`.`user`;\n",
    b"/*!40101 SET @a = 1" + b" " * 300 + b", GLOBAL general_log_file = '/tmp/x' */;\n",
    b"UNLOCK TABLES" + b"\t" * 300 + b", `other`.`t` WRITE;\n",
])
def test_a_statement_padded_past_its_head_is_refused(padded: bytes) -> None:
    """Only a statement's first bytes are read: a short statement of mysqldump's padded
    with blanks past them, then something else, must not pass as it."""
    with pytest.raises(BadRequest, match="longer than this check reads"):
        validate_mysql(iter([HEADER + DUMPLIKE + padded + FOOTER]))


def test_long_rows_and_definitions_still_pass() -> None:
    long_rows = b"INSERT INTO `u` VALUES " + b",".join(b"('%d')" % i for i in range(500)) + b";\n"
    long_view = (b"/*!50001 CREATE ALGORITHM=UNDEFINED */\n/*!50013 DEFINER=`root`@`localhost` "
                 b"SQL SECURITY DEFINER */\n/*!50001 VIEW `v` AS select " +
                 b", ".join(b"`a` AS `c%d`" % i for i in range(100)) + b" from `t` */;\n")
    validate_mysql(iter([HEADER + DUMPLIKE + long_rows + long_view + FOOTER]))
