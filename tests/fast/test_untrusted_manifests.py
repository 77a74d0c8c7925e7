"""A manifest read back from storage is hostile input (issue 20.4): one that disagrees with
its object (time, file name, codec chain…) is listed as damaged — the rest of the listing
stands — a restore refuses it, and it never decides what a prune deletes."""

from __future__ import annotations

from shared import manifests


def test_vet_accepts_what_safehold_writes_and_refuses_lies() -> None:
    name = "backup_postgresql_20261205_010203_2.sql.gz"
    doc = {"filename": name, "engine": "postgresql", "kind": "backup",
           "created_at": "2026-12-05T01:02:03.999123Z", "sha256": "a" * 64,
           "size_bytes": 10, "codecs": [{"codec": "gzip"}]}
    assert manifests.vet(doc, name) is doc
    lies = {"engine": "mysql", "kind": "upload", "created_at": "2026-12-05T01:02:06Z",
            "sha256": "A" * 64, "size_bytes": -1, "codecs": [{"codec": "gzip"}, "x"]}
    for key, value in lies.items():
        vetted = manifests.vet({**doc, key: value}, name)
        assert vetted["damaged"] and vetted["filename"] == name, key
        assert set(vetted) == {"filename", "kind", "engine", "created_at", "damaged"}
    assert manifests.vet({**doc, "created_at": "2026-12-05T01:02:03"}, name)["damaged"]


