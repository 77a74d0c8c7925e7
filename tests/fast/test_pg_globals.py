"""The globals at the head of a PostgreSQL backup (issue 21) are untrusted input: parsed
against what `pg_dumpall --globals-only` writes, anything else refused; the roles a
restore creates never get more than one database needs."""

from __future__ import annotations

from typing import Any

import pytest

from shared.formats.pgscript import UnsafeScript
from worker.engines import pg_globals as G

DUMPALL = rb"""--
-- PostgreSQL database cluster dump
--

\restrict Zk3

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Roles
--

CREATE ROLE app_owner;
ALTER ROLE app_owner WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN
  NOREPLICATION NOBYPASSRLS;
CREATE ROLE "app reader";
ALTER ROLE "app reader" WITH NOSUPERUSER INHERIT NOCREATEROLE CREATEDB LOGIN
  NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 5 PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi'
  VALID UNTIL '2030-01-01 00:00:00+00';
COMMENT ON ROLE "app reader" IS 'it''s the
reader';
CREATE ROLE admin;
ALTER ROLE admin WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;
CREATE ROLE other_app;
ALTER ROLE other_app WITH LOGIN;

--
-- User Configurations
--

ALTER ROLE "app reader" SET search_path TO 'app', 'public';
ALTER ROLE "app reader" IN DATABASE shop SET work_mem TO '64MB';
ALTER ROLE "app reader" IN DATABASE elsewhere SET work_mem TO '1GB';
ALTER ROLE "app reader" SET session_preload_libraries TO 'evil';

--
-- Role memberships
--

GRANT app_owner TO "app reader" GRANTED BY postgres;
GRANT pg_read_all_data TO "app reader" GRANTED BY postgres;
GRANT admin TO "app reader" WITH ADMIN OPTION GRANTED BY postgres;

CREATE TABLESPACE fast OWNER postgres LOCATION '/mnt/fast';
GRANT SET ON PARAMETER work_mem TO other_app;

\unrestrict Zk3

--
-- PostgreSQL database cluster dump complete
--
"""


def lines(text: bytes) -> list[bytes]:
    return text.split(b"\n")


def test_what_pg_dumpall_writes_is_read() -> None:
    g = G.parse(lines(DUMPALL))
    assert set(g.roles) == {"app_owner", "app reader", "admin", "other_app"}
    reader = g.roles["app reader"]
    assert reader.password == "SCRAM-SHA-256$4096:abc$def:ghi"
    assert reader.connection_limit == 5 and reader.valid_until == "2030-01-01 00:00:00+00"
    assert reader.comment == "it's the\nreader"
    assert reader.settings[0] == (None, "search_path", ["app", "public"])
    assert G.Membership("app_owner", "app reader") in g.memberships
    assert G.Membership("admin", "app reader", admin=True) in g.memberships
    assert any("fast" in x for x in g.left_out)
    assert any("parameter work_mem" in x for x in g.left_out)


def test_the_plan_creates_what_the_database_needs_and_withholds_the_rest() -> None:
    g = G.parse(lines(DUMPALL))
    # the new server has admin (a superuser) and the predefined roles
    p = G.plan(g, ["app_owner"], {"admin", "pg_read_all_data"}, database="shop",
               superuser=False, settable=lambda name: name in ("search_path", "work_mem"))
    # the owner, and the reader that is a member of it; not other_app, not admin
    assert p.created == ["app reader", "app_owner"]
    assert "\n" not in p.sql  # one line: psql's line numbers stay the file's
    assert 'CREATE ROLE "app reader" WITH INHERIT LOGIN' in p.sql.replace(
        "NOSUPERUSER ", "").replace("NOCREATEROLE ", "")
    assert "CREATEDB not given to app reader" in " ".join(p.warnings)
    assert "PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi'" in p.sql
    assert 'GRANT "app reader" TO CURRENT_USER;' in p.sql  # the restorer owns through it
    assert "IN DATABASE \"shop\" SET work_mem TO '64MB'" in p.sql
    assert "1GB" not in p.sql and "evil" not in p.sql
    assert "E'it''s the\\nreader'" in p.sql
    assert 'GRANT "app_owner" TO "app reader";' in p.sql
    # a membership in a superuser or a predefined role is never granted from a backup
    assert "pg_read_all_data" not in p.sql and 'GRANT "admin"' not in p.sql
    said = " ".join(p.warnings)
    assert "pg_read_all_data to app reader" in said and "admin to app reader" in said
    assert "session_preload_libraries" in said and "fast" in said


def test_attributes_that_reach_beyond_the_database_are_never_given() -> None:
    g = G.parse(lines(b"CREATE ROLE boss;\nALTER ROLE boss WITH SUPERUSER REPLICATION "
                      b"BYPASSRLS CREATEROLE CREATEDB LOGIN PASSWORD 'x';\n"))
    p = G.plan(g, ["boss"], set(), database="d", superuser=True)
    assert p.sql == "CREATE ROLE \"boss\" WITH LOGIN PASSWORD 'x';"
    assert all(f"{a} not given to boss" in " ".join(p.warnings) for a in G.WITHHELD)


@pytest.mark.parametrize("head", [
    b"DROP DATABASE postgres;",
    b"\\! touch /tmp/x",
    b"CREATE ROLE a;\nALTER ROLE a WITH SUPERUSER; SELECT pg_sleep(1);",
    b"CREATE ROLE a;\nALTER ROLE a WITH PASSWORD E'x\\' ';",
    b"CREATE ROLE a;\nGRANT a TO b;",  # b never created
    b"ALTER ROLE nobody WITH LOGIN;",
    b"CREATE ROLE a;\nALTER ROLE a SET x TO 'y'; ALTER SYSTEM SET fsync = off;",
    b"CREATE ROLE a",  # cut off
    b"CREATE ROLE a;\nALTER ROLE a WITH LOGIN SUPERDUPER;",
    b"CREATE ROLE a;\nCOMMENT ON ROLE a IS 'x' || current_user;",
    b"CREATE ROLE \"a\x00b\";",
    b"CREATE ROLE a;\r\nALTER ROLE a WITH LOGIN;",
])
def test_anything_else_is_refused(head: bytes) -> None:
    with pytest.raises(UnsafeScript) as err:
        G.parse(lines(head), 12)
    assert err.value.code == "unsafe_backup" and "line 12:" in err.value.message


def test_the_head_is_only_the_head() -> None:
    """`-- G` lines count only before the dump's first line: the same text further down
    (a comment, a COPY row) is the database's, never a role."""
    head = G.GlobalsHead()
    body = (b"--\n-- Safehold: globals\n--\n-- G CREATE ROLE a;\n-- G\n-- G GRANT x TO a;\n"
            b"--\n-- PostgreSQL database dump\n-- G CREATE ROLE later;\n")
    for i in range(0, len(body), 7):  # any chunking
        head.feed(body[i:i + 7])
    assert head.done and head.first_line == 4
    assert head.lines == [b"CREATE ROLE a;", b"", b"GRANT x TO a;"]
    assert bytes(head.held) == body  # all passed on unchanged
    plain = G.GlobalsHead()
    plain.feed(b"--\n-- PostgreSQL database dump\n--\n\n\\restrict k\n")
    assert plain.done and plain.lines == []


async def test_commented_round_trips_through_the_head() -> None:
    async def source() -> Any:
        for piece in (b"CREATE ROLE a;\nALTER ROLE a WITH LO", b"GIN;\n\nGRANT", b" a TO a"):
            yield piece
    out = b"".join([c async for c in G.commented(source())])
    assert out == b"-- G CREATE ROLE a;\n-- G ALTER ROLE a WITH LOGIN;\n-- G \n-- G GRANT a TO a\n"
    head = G.GlobalsHead()
    head.feed(out + b"SELECT 1;\n")
    assert head.lines == [b"CREATE ROLE a;", b"ALTER ROLE a WITH LOGIN;", b"",
                          b"GRANT a TO a"]


def test_no_membership_in_an_existing_role_and_no_superuser_setting() -> None:
    """An existing role may hold CREATEROLE (which grants anything, pg_execute_server_program
    included, on PostgreSQL 15): a created login role never becomes its member; a setting
    only a superuser may set (session_replication_role) is never given."""
    g = G.parse(lines(b"CREATE ROLE ops;\nCREATE ROLE evil;\nALTER ROLE evil WITH LOGIN "
                      b"PASSWORD 'pw';\nGRANT ops TO evil GRANTED BY postgres;\n"
                      b"ALTER ROLE evil SET session_replication_role TO 'replica';\n"))
    # reached only through its membership in an existing role: not created at all
    assert G.plan(g, ["ops"], {"ops"}, database="d", superuser=True).created == []
    # named by the dump itself: created, but not made a member, and without the setting
    p = G.plan(g, ["ops", "evil"], {"ops"}, database="d", superuser=True,
               settable=lambda name: name == "search_path")
    assert p.created == ["evil"]
    assert p.sql == "CREATE ROLE \"evil\" WITH LOGIN PASSWORD 'pw';"
    said = " ".join(p.warnings)
    assert "ops to evil" in said and "session_replication_role of evil" in said


def test_postgresql_16_memberships_are_read_and_never_widened() -> None:
    g = G.parse(lines(
        b"CREATE ROLE owner;\nCREATE ROLE app;\nCREATE ROLE narrow;\n"
        b"GRANT owner TO app WITH ADMIN OPTION, INHERIT TRUE GRANTED BY postgres;\n"
        b"GRANT owner TO narrow WITH INHERIT FALSE, SET FALSE GRANTED BY postgres;\n"
        b"COMMENT ON ROLE app IS E'C:\\\\data ''x''';\n"))
    assert G.Membership("owner", "app", admin=True) in g.memberships
    assert G.Membership("owner", "narrow", limited=True) in g.memberships
    assert g.roles["app"].comment == "C:\\data 'x'"
    p = G.plan(g, ["owner"], set(), database="d", superuser=True)
    assert 'GRANT "owner" TO "app" WITH ADMIN OPTION;' in p.sql
    assert 'CREATE ROLE "narrow"' in p.sql and 'TO "narrow"' not in p.sql
    assert "owner to narrow (INHERIT/SET FALSE)" in " ".join(p.warnings)
    assert "E'C:\\\\data ''x'''" in p.sql


def test_a_plan_reads_the_referenced_roles_once_whatever_iterable_it_is_given() -> None:
    """The members of a role the restore creates come too, from a generator as from a list
    (a refactor once read a generator twice: the second read was empty)."""
    from worker.engines import pg_globals

    g = pg_globals.Globals(memberships=[pg_globals.Membership("owner", "alice")])
    for referenced in (["owner"], (r for r in ["owner"])):
        plan = pg_globals.plan(g, referenced, set(), database="d", superuser=True)
        assert plan.created == ["alice", "owner"]
