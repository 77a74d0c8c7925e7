"""The cut of a plain pg_dump to some tables (shared.formats.pgtables), fed hostile
scripts: a section header inside a function body or a string is no header; a section of a
restored table that holds anything about another table is refused; statements glued on
one line, non-settings in the preamble and sections that never say what they are about
are refused or dropped; nothing outside the tables' sections reaches psql."""

from __future__ import annotations

import pytest

from shared.errors import BadRequest
from shared.formats.pgscript import PgScriptGuard
from shared.formats.pgtables import HOLD_MAX, RefusedSection, Selection, TableCut, classify

HEAD = """--
-- PostgreSQL database dump
--

SET statement_timeout = 0;
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
"""
FOOT = """
--
-- PostgreSQL database dump complete
--
"""


def section(kind: str, tag: str, body: str, data: bool = False) -> str:
    lead = "Data for Name" if data else "Name"
    return f"\n--\n-- {lead}: {tag}; Type: {kind}; Schema: app; Owner: app\n--\n\n{body}\n"


ORDERS_DATA = section("TABLE DATA", "orders", "COPY app.orders (id, total) FROM stdin;\n"
                      "1\t10\n2\t20\n\\.\n", data=True)
CUSTOMERS_DATA = section("TABLE DATA", "customers", "COPY app.customers (id) FROM stdin;\n"
                         "1\n\\.\n", data=True)
SEQ_SET = section("SEQUENCE SET", "orders_id_seq",
                  "SELECT pg_catalog.setval('app.orders_id_seq', 2, true);")
ORDERS = ("app", "orders")


def cut(script: str, sel: Selection | None = None, chunk: int = 5) -> tuple[bytes, TableCut]:
    tc = TableCut(sel or Selection(data={ORDERS}, create=set(),
                                   sequences={("app", "orders_id_seq")}))
    guard = PgScriptGuard(cut=tc)
    data = script.encode()
    out = b"".join(guard.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return out + guard.finish(), tc


def test_only_the_tables_data_and_its_sequence_pass() -> None:
    out, tc = cut(HEAD + CUSTOMERS_DATA + ORDERS_DATA + SEQ_SET + FOOT)
    # the COPY header as Safehold writes it, the rows as dumped
    assert b'COPY "app"."orders" ("id", "total") FROM stdin;\n1\t10\n2\t20\n' in out
    assert b"customers" not in out
    assert b"setval" not in out  # held back: sent after every check
    assert b"""setval('"app"."orders_id_seq"', 2, true)""" in b"".join(tc.deferred)
    assert b"SET standard_conforming_strings = on;" in out
    assert tc.loaded == {ORDERS}


def test_a_header_inside_a_function_body_or_string_is_no_header() -> None:
    body = ("CREATE FUNCTION app.f() RETURNS void LANGUAGE sql AS $$\n"
            "--\n-- Data for Name: orders; Type: TABLE DATA; Schema: app; Owner: app\n--\n"
            "SELECT 1;\n$$;\n"
            "COMMENT ON FUNCTION app.f() IS '\n"
            "-- Data for Name: orders; Type: TABLE DATA; Schema: app; Owner: app\n"
            "';")
    out, _ = cut(HEAD + section("FUNCTION", "f()", body) + ORDERS_DATA + FOOT)
    assert b"SELECT 1" not in out and b"FUNCTION" not in out.replace(b"-- ", b"")
    assert b'COPY "app"."orders"' in out


def test_a_section_that_lies_about_its_table_is_not_taken() -> None:
    lie = section("TABLE DATA", "orders", "COPY app.customers (id) FROM stdin;\n9\n\\.\n",
                  data=True)
    with pytest.raises(RefusedSection, match="no data for app.orders"):
        cut(HEAD + lie + FOOT)


@pytest.mark.parametrize("extra", [
    "DELETE FROM app.customers;",  # a second statement in the orders section
    "UPDATE app.orders SET total = 0 FROM app.customers;",
    "SELECT pg_catalog.setval('app.customers_id_seq', 99, true);",
])
def test_a_kept_section_about_anything_else_is_refused(extra: str) -> None:
    bad = ORDERS_DATA.rstrip("\n") + "\n" + extra + "\n"
    with pytest.raises(RefusedSection, match="something else"):
        cut(HEAD + bad + FOOT)


@pytest.mark.parametrize("glued", [
    "SELECT pg_catalog.setval('app.orders_id_seq', 2, true); DELETE FROM app.customers;",
    "SELECT pg_catalog.setval('app.orders_id_seq', 2, true); DELETE\nFROM app.customers;",
])
def test_statements_glued_on_one_line_are_refused(glued: str) -> None:
    """A statement must be its line's own: glued to another, it is no pg_dump statement
    (the section is not taken) or, in a section already taken, the restore is refused."""
    out, tc = cut(HEAD + ORDERS_DATA + section("SEQUENCE SET", "orders_id_seq", glued) + FOOT)
    assert b"DELETE" not in out and not tc.deferred
    with pytest.raises(RefusedSection):
        cut(HEAD + ORDERS_DATA.replace("\\.\n", "\\.\nSET lock_timeout = 0; DELETE FROM "
                                       "app.customers;\n") + FOOT)


def test_the_preamble_passes_settings_only() -> None:
    out, _ = cut(HEAD + "DELETE FROM app.customers;\nSET lock_timeout = 0;\n"
                 + ORDERS_DATA + FOOT)
    assert b"DELETE" not in out and b"SET lock_timeout = 0;" in out


def test_a_section_that_never_says_what_it_is_about_is_bounded() -> None:
    filler = "".join(f"-- {'x' * 1000}\n" for _ in range(HOLD_MAX // 1000 + 10))
    with pytest.raises(RefusedSection, match="before a statement"):
        cut(HEAD + section("TABLE DATA", "orders", filler, data=True) + FOOT,
            chunk=1 << 16)


def test_a_dropped_table_takes_its_sections_and_the_keys_that_pointed_at_it() -> None:
    script = HEAD + "".join([
        section("TABLE", "orders", "CREATE TABLE app.orders (\n    id integer NOT NULL\n);"
                "\n\nALTER TABLE app.orders OWNER TO app;"),
        section("TABLE", "customers", "CREATE TABLE app.customers (id int);"),
        section("SEQUENCE", "orders_id_seq", "CREATE SEQUENCE app.orders_id_seq\n    AS "
                "integer;\n\nALTER TABLE app.orders_id_seq OWNER TO app;"),
        section("SEQUENCE OWNED BY", "orders_id_seq",
                "ALTER SEQUENCE app.orders_id_seq OWNED BY app.orders.id;"),
        section("SEQUENCE", "customers_id_seq", "CREATE SEQUENCE app.customers_id_seq;"),
        section("SEQUENCE OWNED BY", "customers_id_seq",
                "ALTER SEQUENCE app.customers_id_seq OWNED BY app.customers.id;"),
        ORDERS_DATA, CUSTOMERS_DATA, SEQ_SET,
        section("INDEX", "orders_total", 'CREATE INDEX orders_total ON app.orders USING '
                'btree (total);'),
        section("INDEX", "customers_x", "CREATE INDEX customers_x ON app.customers (id);"),
        section("COMMENT", "INDEX orders_total", "COMMENT ON INDEX app.orders_total IS 'i';"),
        section("FK CONSTRAINT", "items items_fk", "ALTER TABLE ONLY app.items\n    ADD "
                "CONSTRAINT items_fk FOREIGN KEY (o) REFERENCES app.orders(id);"),
        section("FK CONSTRAINT", "lines lines_fk", "ALTER TABLE ONLY app.lines\n    ADD "
                "CONSTRAINT lines_fk FOREIGN KEY (o) REFERENCES app.orders(id);"),
    ]) + FOOT
    sel = Selection(data=set(), create={ORDERS}, live_tables={("app", "items")})
    out, tc = cut(script, sel)
    text = out.decode()
    for kept in ("CREATE TABLE app.orders", "CREATE SEQUENCE app.orders_id_seq",
                 "OWNED BY app.orders.id", 'COPY "app"."orders"', "CREATE INDEX orders_total",
                 "COMMENT ON INDEX app.orders_total", "items_fk"):
        assert kept in text, kept
    for dropped in ("customers", "lines_fk"):  # lines is not a live table
        assert dropped not in text, dropped
    assert tc.created == {ORDERS} and tc.incoming_fks == ["app.items.items_fk"]
    assert tc.owned == {("app", "orders_id_seq")}


@pytest.mark.parametrize("sql, kind, rel", [
    ('ALTER TABLE ONLY "My Schema"."Or""ders"\n    ADD CONSTRAINT x CHECK (true);', "table",
     ("My Schema", 'Or"ders')),
    ("CREATE TRIGGER t AFTER UPDATE OF \"on\" ON app.orders FOR EACH ROW EXECUTE "
     "FUNCTION app.f();", "table", ORDERS),
    ("GRANT SELECT(total) ON TABLE app.orders TO reader;", "table", ORDERS),
    ("DELETE FROM app.orders;", "other", None),
    ("SET search_path = app;", "other", None),  # only the settings pg_dump writes, as written
    ("SELECT pg_catalog.set_config('search_path', '', false);", "neutral", None),
    ("SELECT pg_catalog.set_config('search_path','',false), pg_catalog.setval('app.c', 1);",
     "other", None),
    ("SELECT pg_catalog.setval('app.s', 2, true), app.purge();", "other", None),
    ("GRANT ALL ON TABLE app.new , app.customers TO PUBLIC;", "other", None),
    ("CREATE TABLE app.new PARTITION OF app.other DEFAULT;", "other", None),
    ("CREATE TABLE app.new (i int) INHERITS (app.other);", "other", None),
    ("ALTER TABLE app.new ATTACH PARTITION app . customers DEFAULT;", "other", None),
    ("ALTER TABLE ONLY app.customers DROP COLUMN email, ADD CONSTRAINT fk FOREIGN KEY (id) "
     "REFERENCES app.new(id) NOT VALID;", "other", None),
    ("CREATE TRIGGER t AFTER UPDATE OF \"a ON app.new b\" ON app.customers FOR EACH ROW "
     "EXECUTE FUNCTION f();", "table", ("app", "customers")),
    ("ALTER TABLE ONLY app.orders ADD CONSTRAINT x CHECK (true), DISABLE TRIGGER ALL;",
     "other", None),
])
def test_statements_say_what_they_are_about(sql: str, kind: str, rel: object) -> None:
    from shared.formats.pgscript import PgScriptGuard

    guard = PgScriptGuard()  # the guard's view of the statement (literals blanked)
    guard.feed(sql.encode() + b"\n")
    head = sql.encode()
    for lit in __import__("re").findall(rb"'[^']*'", head):
        head = head.replace(lit, b" ")
    st = classify(sql, head)
    assert (st.kind, st.rel) == (kind, rel)


# what a crafted backup might put in a section of a table being made again (a dropped
# `app.new`); none of it may reach psql
HOSTILE = [
    "SET default_tablespace = ''; TRUNCATE app.customers; DROP TABLE app.audit;",
    "SET statement_timeout = 0; /*\nCOPY app.new (id) FROM stdin x */ TRUNCATE app.customers;",
    "CREATE TRIGGER t /* ON app.new */ AFTER INSERT ON app.customers FOR EACH ROW EXECUTE "
    "FUNCTION f();",
    "ALTER TABLE app.new OWNER TO x /* ADD GENERATED x SEQUENCE NAME app.c_seq */;\n"
    "SELECT pg_catalog.setval('app.c_seq', 1, true);",
    "SELECT pg_catalog.setval('app.customers_id_seq', 1, true);",
    "GRANT ALL ON TABLE app.new , app.customers TO PUBLIC;",
    "CREATE TABLE app.x (i int);",
]


@pytest.mark.parametrize("bad", HOSTILE)
@pytest.mark.parametrize("kind", ["TABLE", "TABLE DATA", "FUNCTION", "SEQUENCE SET"])
def test_nothing_about_another_table_reaches_psql(bad: str, kind: str) -> None:
    new = ("app", "new")
    script = HEAD + section("TABLE", "new", "CREATE TABLE app.new (\n    id integer\n);") + \
        section(kind, "new", bad, data=kind == "TABLE DATA") + \
        section("TABLE DATA", "new", "COPY app.new (id) FROM stdin;\n1\n\\.\n", data=True) + FOOT
    try:
        out, tc = cut(script, Selection(data=set(), create={new},
                                        live_tables={("app", "customers")}))
    except RefusedSection:
        return  # refused: nothing was committed
    sent = out + b"".join(tc.deferred)
    for word in (b"TRUNCATE", b"customers", b"audit", b"c_seq", b"app.x", b"PUBLIC"):
        assert word not in sent, (word, sent)


def test_a_statement_after_a_comment_on_its_line_is_refused() -> None:
    """Reviewer's H3: a comment opened after a statement hides where the next one starts."""
    bad = ORDERS_DATA.replace("COPY app.orders", "SET statement_timeout = 0; /*\nCOPY app.orders"
                              ).replace(" FROM stdin;\n", " FROM stdin x */ DELETE FROM "
                                        "app.customers;\n", 1)
    with pytest.raises(BadRequest):  # the section is not taken, then the rest is no SQL
        cut(HEAD + bad + FOOT)
    tc = TableCut(Selection(data={ORDERS}, create=set()))
    guard = PgScriptGuard(cut=tc)
    out = guard.feed((HEAD + bad).split("1\t10")[0].encode())
    assert b"DELETE" not in out and b"customers" not in out


def test_a_carriage_return_after_a_string_hides_nothing() -> None:
    """Second review, #1: after a string, `--` then a carriage return: psql ends the
    comment there and runs what follows; the guard refuses it (with or without a cut)."""
    line = "SELECT 'x' --\r; COMMIT; CREATE ROLE evil SUPERUSER LOGIN;\n;\n"
    with pytest.raises(BadRequest, match="carriage return"):
        PgScriptGuard().feed((HEAD + line + FOOT).encode())
    with pytest.raises(BadRequest, match="carriage return"):
        PgScriptGuard().feed((HEAD + "SELECT 'x' \r; DROP TABLE t;\n" + FOOT).encode())


NEW = ("app", "new")
NEW_TABLE = section("TABLE", "new", "CREATE TABLE app.new (\n    id integer\n);")
NEW_DATA = section("TABLE DATA", "new", "COPY app.new (id) FROM stdin;\n1\n\\.\n", data=True)


def made(*sections: str) -> tuple[bytes, TableCut]:
    return cut(HEAD + "".join(sections) + FOOT, Selection(data=set(), create={NEW},
                                                          live_tables={("app", "customers")}))


def test_a_live_sequence_cannot_be_taken_over() -> None:
    """Second review, #2: a SEQUENCE section that only comments on a live sequence is not
    a sequence made here; its OWNED BY, setval and grant never pass."""
    out, tc = made(
        NEW_TABLE,
        section("SEQUENCE", "x", "COMMENT ON SEQUENCE app.customers_id_seq IS 'x';"),
        section("SEQUENCE OWNED BY", "x",
                "ALTER SEQUENCE app.customers_id_seq OWNED BY app.new.id;"),
        NEW_DATA,
        section("SEQUENCE SET", "x", "SELECT pg_catalog.setval('app.customers_id_seq', 1, "
                "false);"),
        section("ACL", "x", "GRANT ALL ON SEQUENCE app.customers_id_seq TO PUBLIC;"))
    assert b"customers_id_seq" not in out + b"".join(tc.deferred)
    assert ("app", "customers_id_seq") not in tc.owned


@pytest.mark.parametrize("definition", [
    "CREATE TABLE app.new (\n    id integer,\n    x bigint DEFAULT "
    "pg_catalog.setval('app.customers_id_seq'::regclass, 777)\n);",
    "CREATE TABLE app.new (\n    id integer,\n    CONSTRAINT c CHECK ((pg_catalog.nextval("
    "'app.customers_id_seq') > 0))\n);",
    "CREATE TABLE app.new (\n    id integer CHECK (pg_create_physical_replication_slot("
    "'s', true) IS NOT NULL)\n);",
    "CREATE TABLE app.new (\n    id integer GENERATED ALWAYS AS (app.audit_me(id)) STORED\n);",
])
def test_a_remade_tables_definition_calls_no_function_with_effects(definition: str) -> None:
    """Second review, #3: defaults, checks and generated columns run while the rows load;
    a call beyond side-effect-free functions (or nextval of a sequence not made here) is
    refused."""
    with pytest.raises(RefusedSection, match="calls"):
        made(section("TABLE", "new", definition), NEW_DATA)


def test_a_remade_table_keeps_its_own_serial_default_and_checks() -> None:
    out, _ = made(
        section("TABLE", "new", "CREATE TABLE app.new (\n    id integer NOT NULL,\n    name "
                "character varying(50),\n    CONSTRAINT n CHECK ((length((name)::text) > 0))"
                "\n);"),
        section("SEQUENCE", "new_id_seq", "CREATE SEQUENCE app.new_id_seq\n    AS integer;"),
        section("SEQUENCE OWNED BY", "new_id_seq",
                "ALTER SEQUENCE app.new_id_seq OWNED BY app.new.id;"),
        section("DEFAULT", "new id", "ALTER TABLE ONLY app.new ALTER COLUMN id SET DEFAULT "
                "nextval('app.new_id_seq'::regclass);"),
        NEW_DATA)
    assert b"SET DEFAULT nextval('app.new_id_seq'::regclass)" in out
