"""Row counts taken from the dump stream (what a restore drill later compares): MySQL's
`InsertRows` against hostile values in both dump layouts and any chunking. No servers."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engines.mysql import InsertRows

_ESCAPES = {0: b"\\0", 0x0A: b"\\n", 0x0D: b"\\r", 0x1A: b"\\Z", 0x27: b"\\'", 0x22: b'\\"',
            0x5C: b"\\\\"}


def escape(value: bytes) -> bytes:
    """mysql_real_escape_string, as mysqldump quotes a string."""
    return b"'" + b"".join(_ESCAPES.get(c, bytes([c])) for c in value) + b"'"


values = st.one_of(
    st.just(b"NULL"),
    st.integers(-2**63, 2**63).map(lambda n: str(n).encode()),
    st.binary(max_size=8).map(lambda b: b"0x" + b.hex().upper().encode() if b else b"''"),
    # strings made of the bytes that matter to a parser: quotes, escapes, parens, ; and \n
    st.lists(st.sampled_from([b"'", b"\\", b"(", b")", b",", b";", b"\n", b"\0", b"x",
                              b"),(", b"VALUES", b"\nINSERT INTO `t` VALUES (1);\n"]),
             max_size=12).map(lambda parts: escape(b"".join(parts))),
)
rows = st.lists(st.lists(values, min_size=1, max_size=4), max_size=6)
names = st.text(alphabet="ab`),( ';\n", min_size=1, max_size=6)


def quote(name: str) -> bytes:
    return ("`" + name.replace("`", "``") + "`").encode()


def dump(tables: dict[str, list[list[list[bytes]]]], row_per_line: bool) -> bytes:
    """A dump shaped like mysqldump's (one line per statement) or mariadb-dump 10.11's
    (one line per row), with a trigger body after the data that looks like an INSERT."""
    out = [b"-- MariaDB dump\n--\n-- Host: localhost\n"]
    for name, statements in tables.items():
        q = quote(name)
        out.append(b"\n--\n-- Table structure for table " + q + b"\n--\n\nCREATE TABLE " + q
                   + b" (\n  `a` text\n);\n")
        out.append(b"\n--\n-- Dumping data for table " + q + b"\n--\n\nLOCK TABLES " + q
                   + b" WRITE;\n/*!40000 ALTER TABLE " + q + b" DISABLE KEYS */;\n")
        for statement in statements:
            if not statement:
                continue
            tuples = [b"(" + b",".join(r) + b")" for r in statement]
            if row_per_line:
                out.append(b"INSERT INTO " + q + b" VALUES\n" + b",\n".join(tuples) + b";\n")
            else:
                out.append(b"INSERT INTO " + q + b" VALUES " + b",".join(tuples) + b";\n")
        out.append(b"/*!40000 ALTER TABLE " + q + b" ENABLE KEYS */;\nUNLOCK TABLES;\n")
        out.append(b"DELIMITER ;;\n/*!50003 CREATE*/ /*!50003 TRIGGER x AFTER INSERT ON " + q
                   + b" FOR EACH ROW\nINSERT INTO " + q + b" VALUES (1), (2) */;;\n"
                   b"DELIMITER ;\n")
    out.append(b"-- Dump completed on 2026-11-30\n")
    return b"".join(out)


def count(data: bytes, cuts: list[int]) -> dict[str, int]:
    counter = InsertRows()
    last = 0
    for cut in sorted(set(cuts)):
        counter.feed(data[last:cut])
        last = cut
    counter.feed(data[last:])
    return counter.counts


@settings(max_examples=300, deadline=None)
@given(tables=st.dictionaries(names, st.lists(st.lists(st.lists(values, min_size=1,
                                                                 max_size=3), max_size=5),
                                              max_size=3), min_size=1, max_size=3),
       row_per_line=st.booleans(), seed=st.integers(0, 2**32))
def test_insert_rows_counts_every_row_whatever_the_values_and_chunking(
        tables: dict[str, list[list[list[bytes]]]], row_per_line: bool, seed: int) -> None:
    data = dump(tables, row_per_line)
    expected = {name: sum(len(s) for s in statements) for name, statements in tables.items()}
    rng = random.Random(seed)
    assert count(data, []) == expected
    assert count(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(40))]) \
        == expected
    assert count(data, list(range(0, len(data), rng.choice([1, 2, 3, 5])))) == expected


def test_a_table_without_rows_counts_zero_and_a_long_value_costs_no_memory() -> None:
    big = escape(b"'(" * 3_000_000)  # 12 MB of quotes and parens in one value
    data = dump({"empty": [], "big": [[[big, b"1"], [b"NULL", b"2"]]]}, row_per_line=False)
    counter = InsertRows()
    for i in range(0, len(data), 65536):
        counter.feed(data[i:i + 65536])
        assert len(counter._tail) < 70_000
    assert counter.counts == {"empty": 0, "big": 2}


def test_copy_rows_counts_rows_and_data_bytes_of_each_table_in_any_chunking() -> None:
    """PostgreSQL's `CopyRows`: rows and the bytes of each table's COPY data (what
    …/contents shows), the same however the stream is cut; a COPY inside a function body
    is not data."""
    from worker.engines.pg_drill import CopyRows

    a_rows = [b"1\tx\n", b"2\t\\\\.\n", b"3\t" + b"y" * 5000 + b"\n"]
    dump = (b"--\n-- Name: f; Type: FUNCTION; Schema: public; Owner: o\n--\n\n"
            b"CREATE FUNCTION f() RETURNS void AS $$\nCOPY fake FROM stdin;\n$$;\n\n"
            b"--\n-- Data for Name: a; Type: TABLE DATA; Schema: public; Owner: o\n--\n\n"
            b"COPY public.a (i, t) FROM stdin;\n" + b"".join(a_rows) + b"\\.\n\n\n"
            b"--\n-- Data for Name: b; Type: TABLE DATA; Schema: public; Owner: o\n--\n\n"
            b"COPY public.b (i) FROM stdin;\n\\.\n\n\n")
    rng = random.Random(7)
    for _ in range(200):
        counter = CopyRows()
        i = 0
        while i < len(dump):
            n = rng.randint(1, 64)
            counter.feed(dump[i:i + n])
            i += n
        found = counter.result()
        assert found["exact_counts"] == {"public.a": 3, "public.b": 0}, found
        assert found["exact_sizes"] == {"public.a": len(b"".join(a_rows)),
                                        "public.b": 0}, found
