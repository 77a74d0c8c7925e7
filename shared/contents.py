"""What a backup holds, as recorded at backup time (issue 25): its tables, collections or
key spaces with their counts (and, for PostgreSQL, the bytes of each table's data as
dumped), read from the manifest alone — no byte of the backup is read,
so a viewer may look. Exact counts (taken from the dump stream as it passed) are preferred;
an engine that only had estimates says so. The manifest is read back, never believed: only
names and non-negative integers are shown, bounded."""

from __future__ import annotations

from collections.abc import Mapping

from shared import backup_sets
from shared.manifests import count_in

MAX_ITEMS = 10_000  # a manifest claiming more is cut (and says so)
UNITS = {"rows": "rows", "rows_estimate": "rows", "keys": "keys", "documents": "documents"}


def _items(counts: object) -> list[dict[str, object]]:
    if not isinstance(counts, Mapping):
        return []
    out: list[dict[str, object]] = []
    for name, n in list(counts.items())[:MAX_ITEMS]:
        if not isinstance(name, str) or not name or len(name) > 512 or "\x00" in name:
            continue
        if isinstance(n, Mapping):  # a nested count (neo4j: nodes by label)
            out += [{"name": f"{name}.{k}", "count": v} for k, v in n.items()
                    if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                    and v >= 0][:MAX_ITEMS]
            continue
        ok = isinstance(n, int) and not isinstance(n, bool) and n >= 0
        out.append({"name": name, "count": n if ok else None})
    return out


def _one(manifest: Mapping[str, object]) -> dict[str, object]:
    exact = manifest.get("exact_counts")
    kind = str(manifest.get("exact_count_kind") if isinstance(exact, Mapping)
               else manifest.get("count_kind") or "")
    items = _items(exact if isinstance(exact, Mapping) else manifest.get("counts"))
    sizes = manifest.get("exact_sizes")  # each table's data as dumped (PostgreSQL)
    if isinstance(sizes, Mapping):
        for item in items:
            n = sizes.get(item["name"])
            if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                item["bytes"] = n
    return {"unit": UNITS.get(kind, kind or None),
            "exact": isinstance(exact, Mapping) or kind in ("keys", "documents"),
            "items": items,
            "total": sum(int(str(i["count"])) for i in items if i["count"] is not None)}


def contents(manifest: Mapping[str, object]) -> dict[str, object]:
    """`GET …/backups/{file}/contents`: the backup's items and counts (a server set: per
    database)."""
    view: dict[str, object] = {"backup": manifest.get("filename"),
                               "engine": manifest.get("engine"),
                               "created_at": manifest.get("created_at"),
                               "raw_bytes": count_in(manifest, "raw_bytes")}
    members = backup_sets.member_entries(manifest)
    if members is not None:
        view["databases"] = [{"database": m.get("database"), **_one(m)} for m in members
                             if isinstance(m.get("database"), str)]
        return view
    return {**view, **_one(manifest)}
