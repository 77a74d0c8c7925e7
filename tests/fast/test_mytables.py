"""The cut of a mariadb-dump script to some tables (shared.formats.mytables), fed hostile
scripts: a section comment inside a routine's body is text; a kept section holding a
statement about another table is refused, wherever it sits on the line; the preamble
passes settings only; a table the dump lacks is named."""

from __future__ import annotations

import pytest

from shared.formats.mytables import MyTableCut, RefusedStatement

HEAD = ("-- MariaDB dump 10.19\n/*!40101 SET NAMES utf8mb4 */;\n"
        "/*!40014 SET @OLD_FOREIGN_KEY_CHECKS=@@FOREIGN_KEY_CHECKS, FOREIGN_KEY_CHECKS=0 */;\n")
ORDERS = ("--\n-- Table structure for table `orders`\n--\n\nDROP TABLE IF EXISTS `orders`;\n"
          "CREATE TABLE `orders` (\n  `id` int(11) NOT NULL\n) ENGINE=InnoDB;\n\n"
          "--\n-- Dumping data for table `orders`\n--\n\nLOCK TABLES `orders` WRITE;\n"
          "INSERT INTO `orders` VALUES\n(1),\n(2);\nUNLOCK TABLES;\n")
CUSTOMERS = ("--\n-- Table structure for table `customers`\n--\n\n"
             "DROP TABLE IF EXISTS `customers`;\nCREATE TABLE `customers` (`id` int);\n")
FOOT = "-- Dump completed on 2026-12-07\n"


def cut(script: str, tables: set[str] | None = None, chunk: int = 5) -> bytes:
    c = MyTableCut(tables or {"orders"})
    data = script.encode()
    return b"".join(c.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)) + c.finish()


def test_only_the_tables_sections_and_the_settings_pass() -> None:
    out = cut(HEAD + CUSTOMERS + ORDERS + FOOT)
    assert b"CREATE TABLE `orders`" in out and b"(2);" in out and b"customers" not in out
    assert b"FOREIGN_KEY_CHECKS=0" in out


def test_a_section_comment_inside_a_routine_body_is_text() -> None:
    routine = ("--\n-- Dumping routines for database 'x'\n--\nDELIMITER ;;\n"
               "CREATE PROCEDURE p()\nBEGIN\n"
               "-- Dumping data for table `orders`\n"
               "DELETE FROM customers;\nEND ;;\nDELIMITER ;\n")
    out = cut(HEAD + ORDERS + routine + FOOT)
    assert b"DELETE" not in out and b"PROCEDURE" not in out


@pytest.mark.parametrize("extra", [
    "DELETE FROM customers;\n",
    "INSERT INTO `orders` VALUES (3); DELETE FROM customers;\n",
    "INSERT INTO `customers` VALUES (1);\n",
    "/*!50003 DROP TABLE customers */;\n",
    "UPDATE orders SET id = 0\n;\n",
])
def test_a_kept_section_about_anything_else_is_refused(extra: str) -> None:
    with pytest.raises(RefusedStatement, match="something else"):
        cut(HEAD + ORDERS + extra + FOOT)


def test_the_preamble_passes_settings_only_and_a_missing_table_is_named() -> None:
    out = cut(HEAD + "DROP TABLE customers;\n" + ORDERS + FOOT)
    assert b"DROP TABLE customers" not in out
    with pytest.raises(RefusedStatement, match="no table nothere"):
        cut(HEAD + ORDERS + FOOT, {"orders", "nothere"})


def test_a_statement_padded_past_what_its_check_reads_is_refused() -> None:
    """Only a statement's first bytes are read: `DROP TABLE IF EXISTS `orders`` padded with
    blanks, then `, customers`, must not pass as the dump's own DROP."""
    padded = ORDERS.replace("DROP TABLE IF EXISTS `orders`;",
                            "DROP TABLE IF EXISTS `orders`" + " " * 400 + ", `customers`;")
    with pytest.raises(RefusedStatement, match="longer than its check reads"):
        cut(HEAD + padded + FOOT)
    padded_set = HEAD.replace("SET NAMES utf8mb4 */;", "SET NAMES utf8mb4" + " " * 400 +
                              ", GLOBAL read_only = 1 */;")
    assert b"GLOBAL" not in cut(padded_set + ORDERS + FOOT)
