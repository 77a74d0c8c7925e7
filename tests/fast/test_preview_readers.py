"""The preview's readers on hand-made streams: a mariadb-dump table's rows in both INSERT
layouts and any chunking, a MongoDB tar's collection; hostile bytes refused."""

from __future__ import annotations

import io
import tarfile

import bson
import pytest

from shared.errors import PipelineError, SafeholdError
from shared.formats.mongodocs import DocReader
from shared.formats.myrows import MyRowReader

HEAD = (b"/*!40101 SET NAMES utf8mb4 */;\n"
        b"--\n-- Table structure for table `t`\n--\n\nDROP TABLE IF EXISTS `t`;\n"
        b"CREATE TABLE `t` (\n  `id` int(11) NOT NULL,\n  `s` text DEFAULT NULL,\n"
        b"  `b` varbinary(4) DEFAULT NULL,\n  PRIMARY KEY (`id`)\n) ENGINE=InnoDB;\n\n"
        b"--\n-- Dumping data for table `t`\n--\n\nLOCK TABLES `t` WRITE;\n")
ROWS = [(b"(1,'a\\'b, (c)',0x00ff)", ["1", "a'b, (c)", "\\x00ff"]),
        (b"(2,NULL,NULL)", ["2", None, None]),
        (b"(3,'x\\ny\\\\z',_binary 'q')", ["3", "x\ny\\z", "q"])]


def read(data: bytes, step: int, where: tuple[str, str] | None = None, limit: int = 50
         ) -> MyRowReader:
    reader = MyRowReader("t", where, limit)
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
        if reader.done:
            return reader
    reader.finish()
    return reader


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
@pytest.mark.parametrize("layout", ["one line", "a row a line"])
def test_rows_of_a_mariadb_dump(step: int, layout: str) -> None:
    sep = b"," if layout == "one line" else b",\n"
    insert = (b"INSERT INTO `t` VALUES " if layout == "one line" else
              b"INSERT INTO `t` VALUES\n") + sep.join(r for r, _ in ROWS) + b";\n"
    data = HEAD + insert + b"UNLOCK TABLES;\n"
    reader = read(data, step)
    assert reader.columns == ["id", "s", "b"]
    assert reader.rows == [v for _, v in ROWS] and reader.scanned == 3
    assert read(data, step, ("id", "3")).rows == [ROWS[2][1]]
    assert read(data, step, limit=1).rows == [ROWS[0][1]]


@pytest.mark.parametrize("bad", [b"(1,'a',0x00ff) junk;", b"(1,'unterminated);",
                                 b"(1,SLEEP(5),NULL);", b"(1,'a' 'b',NULL);"])
def test_rows_that_are_not_as_the_dump_writes_them_are_refused(bad: bytes) -> None:
    data = HEAD + b"INSERT INTO `t` VALUES " + bad + b"\nUNLOCK TABLES;\n"
    with pytest.raises(SafeholdError):
        read(data, 5)


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("step", [3, 1 << 20])
def test_documents_of_a_mongodb_backup(step: int) -> None:
    docs = b"".join(bson.encode({"_id": i, "name": f"n{i}", **({"x": [i]} if i % 2 else {})})
                    for i in range(10))
    data = tar_of([("app/other.bson", bson.encode({"_id": "no"})),
                   ("app/things.bson", docs), ("app/things.metadata.json", b"{}")])

    def docs_of(where: tuple[str, str] | None = None, limit: int = 50) -> DocReader:
        reader = DocReader("app.things", where, limit)
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
            if reader.done:
                break
        reader.finish()
        return reader
    got = docs_of()
    assert got.found and got.columns == ["_id", "name", "x"] and len(got.rows) == 10
    assert got.rows[0] == ["0", "n0", None] and got.rows[1] == ["1", "n1", "[1]"]
    assert docs_of(("name", "n7")).rows == [["7", "n7", "[7]"]]
    assert len(docs_of(limit=2).rows) == 2


@pytest.mark.parametrize("members", [
    [("app/things.bson", b"\xff\xff\xff\x7f" + b"x" * 20)],  # a length past 16 MiB
    [("app/things.bson", b"\x05\x00\x00")],  # ends inside a document
    [("../etc/things.bson", bson.encode({"a": 1}))],  # not the mongodump layout
    [("admin/things.bson", bson.encode({"a": 1}))],  # a system database
])
def test_hostile_mongodb_entries_are_refused(members: list[tuple[str, bytes]]) -> None:
    reader = DocReader("app.things", None, 50)
    with pytest.raises((PipelineError, SafeholdError)):
        reader.feed(tar_of(members))
        reader.finish()
