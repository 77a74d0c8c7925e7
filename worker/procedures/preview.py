"""Rows of one table read from a backup, nothing restored (issue 25's preview: "which
backup still has customer 4711?"). Read-only: no target lock, the live database is never
touched. PostgreSQL: the plain stream is decrypted and decompressed as it is read and
stops as soon as `limit` rows matched (shared.formats.pgrows); its sha256 is checked only
when the whole file was read, and the answer says which. MySQL/MariaDB the same way
(shared.formats.myrows); MongoDB: the collection's tar entry, document by document (a
column per top-level field, values as relaxed extended JSON). SQLite: the backup file is
written to the worker's private temp space, checked, and queried read-only."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared import naming, scratch
from shared.codecs.base import AgeKey
from shared.config import TargetConfig
from shared.errors import Conflict, Unprocessable
from shared.formats.mongodocs import DocReader
from shared.formats.myrows import MyRowReader
from shared.formats.pgrows import MAX_VALUE, RowReader
from shared.formats.pgtables import parse_table_name
from shared.formats.sqlite import check_sqlite_file
from shared.jobs import Job, Phase
from shared.manifests import count_in
from worker.procedures.base import ProcedureBase
from worker.progress import Progress


class Previews(ProcedureBase):
    async def preview(self, job: Job, target: TargetConfig, progress: Progress,
                      supplied: Sequence[AgeKey] = ()) -> dict[str, Any]:
        name = naming.parse(str(job.params.get("backup", "")))
        copies = await self.catalog.copies(target.id, name)
        bound = job.params.get("sha256")
        copies = [(s, m) for s, m in copies if not bound or m.get("sha256") == bound]
        if not copies:
            raise Conflict(f"{name.filename} changed since the preview was asked for; ask "
                           "again", code="backup_changed")
        store, manifest = copies[0]
        table = str(job.params.get("table", ""))
        where_text = job.params.get("where")
        where = tuple(str(where_text).split("=", 1)) if where_text else None
        limit = int(job.params.get("limit") or 50)
        ids = [*supplied, *self.identities(target)]
        progress.set_phase(Phase.READING, bytes_total=count_in(manifest, "raw_bytes"))
        result: dict[str, Any] = {"backup": name.filename, "table": table, "where": where_text,
                                  "limit": limit, "from": store.name}
        async with self._plain(store, target, name, manifest, ids, None) as chunks:
            if target.engine == "sqlite":
                result.update(await self._sqlite_rows(chunks, table, where, limit))
                result["checksum_verified"] = True
                return result
            pair = (where[0], where[1]) if where is not None and len(where) == 2 else None
            reader: RowReader | MyRowReader | DocReader
            if target.engine == "mysql":
                reader = MyRowReader(table, pair, limit)
            elif target.engine == "mongodb":
                reader = DocReader(table, pair, limit)
            elif target.engine == "postgresql" and (rel := parse_table_name(table)):
                reader = RowReader(rel, pair, limit)
            else:
                raise Unprocessable(f"a preview reads PostgreSQL, MySQL/MariaDB, MongoDB and "
                                    f"SQLite backups, not {target.engine} (not yet)",
                                    code="invalid_body")
            read = 0
            async for chunk in chunks:
                read += len(chunk)
                progress.add_bytes(len(chunk))
                await asyncio.to_thread(reader.feed, chunk)
                if reader.done:
                    break
            else:
                await asyncio.to_thread(reader.finish)
                read = -1  # the whole file: its sha256 was checked at its end
        if isinstance(reader, DocReader) and not reader.found:
            raise Unprocessable(f"the backup holds no collection {table}",
                                code="table_missing")
        result.update(columns=reader.columns, rows=reader.rows, scanned_rows=reader.scanned,
                      truncated_values=reader.truncated, complete=read == -1 or None,
                      checksum_verified=read == -1,
                      read_plain_bytes=read if read >= 0 else manifest.get("raw_bytes"))
        if read >= 0:
            result["complete"] = len(reader.rows) < limit  # the table's data ended first
        return result

    async def _sqlite_rows(self, chunks: Any, table: str, where: tuple[str, ...] | None,
                           limit: int) -> dict[str, Any]:
        with scratch.private_dir("preview") as tmp:
            path = scratch.private_file(tmp, "backup.db")
            out = await asyncio.to_thread(open, path, "wb")
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)
            finally:
                await asyncio.to_thread(out.close)
            await asyncio.to_thread(check_sqlite_file, path)
            return await asyncio.to_thread(_query, path, table, where, limit)


def _query(path: Path, table: str, where: tuple[str, ...] | None, limit: int
           ) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (table,)).fetchone():
            raise Unprocessable(f"the backup holds no table {table}", code="table_missing")
        q = '"' + table.replace('"', '""') + '"'
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({q})")]
        sql, args = f"SELECT * FROM {q}", []
        if where is not None:
            if where[0] not in columns:
                raise Unprocessable(f"the table has no column {where[0]!r} (it has: "
                                    + ", ".join(columns)[:500] + ")", code="column_missing")
            sql += f' WHERE "{where[0]}" = ?'
            args.append(where[1])
        cur = conn.execute(sql + " LIMIT ?", (*args, limit))
        names = [d[0] for d in cur.description]
        rows = [[_shown(v) for v in r] for r in cur.fetchall()]
    finally:
        conn.close()
    return {"columns": names, "rows": rows, "complete": len(rows) < limit,
            "truncated_values": any(isinstance(v, str) and v.endswith("…") and
                                    len(v) > MAX_VALUE for r in rows for v in r)}


def _shown(value: object) -> str | None:
    if value is None:
        return None
    text = "\\x" + value.hex() if isinstance(value, bytes) else str(value)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE] + "…"
