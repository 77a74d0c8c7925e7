"""The accounts head of a MySQL/MariaDB backup (issue 21), parsed as untrusted input: what
Safehold writes there is read back; a restore never creates an account that logs in
without a password, never grants on a database pattern, never grants to PUBLIC."""

from __future__ import annotations

import pytest

from shared.formats.pgscript import UnsafeScript
from worker.engines import mysql_accounts as A


def parse(*statements: str, db: str = "my_app") -> A.Accounts:
    return A.parse([s.encode() for s in statements], db)


def test_a_login_that_was_not_carried_is_created_locked() -> None:
    a = parse("CREATE USER IF NOT EXISTS `sock`@`%` ACCOUNT LOCK;",
              "CREATE USER IF NOT EXISTS `nopw`@`%` IDENTIFIED VIA mysql_native_password;",
              "CREATE USER IF NOT EXISTS `ok`@`%` IDENTIFIED VIA mysql_native_password "
              "USING '*AB12';",
              "GRANT SELECT ON `my\\_app`.* TO `sock`@`%`;")
    p = A.plan(a, set(), database="my_app", choice="create", mysql=False)
    assert "CREATE USER IF NOT EXISTS `sock`@`%` ACCOUNT LOCK;" in p.sql
    assert "CREATE USER IF NOT EXISTS `nopw`@`%` ACCOUNT LOCK;" in p.sql
    assert "CREATE USER IF NOT EXISTS `ok`@`%` IDENTIFIED VIA mysql_native_password " \
           "USING '*AB12';" in p.sql
    assert "`nopw`@`%`" in " ".join(p.warnings) and "LOCKED" in " ".join(p.warnings)


def test_a_database_grant_means_exactly_the_database() -> None:
    """`_` and `%` are wildcards in a database-level grant: the restore escapes them (a
    grant the backup wrote on `my_app` would also have covered `myXapp`)."""
    a = parse("CREATE USER IF NOT EXISTS `u`@`%` IDENTIFIED VIA mysql_native_password "
              "USING '*AB';", "GRANT SELECT ON `my_app`.* TO `u`@`%`;",
              "GRANT UPDATE ON `my\\_app`.* TO `u`@`%`;",
              "GRANT INSERT ON `my_app`.`t_1` TO `u`@`%`;")
    p = A.plan(a, {"`u`@`%`"}, database="new_db", choice=None, mysql=False)
    assert p.sql.splitlines() == ["GRANT SELECT ON `new\\_db`.* TO `u`@`%`;",
                                  "GRANT UPDATE ON `new\\_db`.* TO `u`@`%`;",
                                  "GRANT INSERT ON `new_db`.`t_1` TO `u`@`%`;"]


@pytest.mark.parametrize("line", [
    "GRANT SELECT ON `my%`.* TO `u`@`%`;",  # a pattern: other databases
    "GRANT SELECT ON `my\\_app`.`t` TO `u`@`%`;",  # escaping means nothing on a table
    "GRANT SELECT ON `my_app`.* TO `PUBLIC`;",
    "GRANT `PUBLIC` TO `u`@`%`;",
    "CREATE ROLE IF NOT EXISTS `public`;",
    "GRANT SELECT ON *.* TO `u`@`%`;",
    "GRANT SUPER ON `my_app`.* TO `u`@`%`;",
])
def test_what_would_reach_beyond_the_database_is_refused(line: str) -> None:
    with pytest.raises(UnsafeScript):
        parse("CREATE USER IF NOT EXISTS `u`@`%` IDENTIFIED VIA mysql_native_password "
              "USING '*AB';", line)


def test_mysql_8_role_grants_with_hosts_are_read() -> None:
    a = parse("CREATE USER IF NOT EXISTS `r`@`%` ACCOUNT LOCK;",
              "CREATE USER IF NOT EXISTS `u`@`%` IDENTIFIED WITH 'caching_sha2_password' "
              "AS 'abc';", "GRANT `r`@`%` TO `u`@`%`;")
    assert a.role_grants == [A.RoleGrant("`r`@`%`", "`u`@`%`", False)]
    p = A.plan(a, set(), database="my_app", choice="create", mysql=True)
    assert "IDENTIFIED WITH 'caching_sha2_password' AS 'abc'" in p.sql
    assert "GRANT `r`@`%` TO `u`@`%`;" in p.sql
