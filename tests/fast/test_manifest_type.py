"""The one manifest builder: core facts typed, engine facts in their own field, never
over a core key; what it writes proves itself with `vet` (the reader's check)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared import manifests, naming

STARTED = datetime(2026, 12, 7, 3, 4, 5, 250000, tzinfo=UTC)
SHA = "ab" * 32


def _manifest(**over: object) -> manifests.Manifest:
    name = naming.new_name("backup", "postgresql", STARTED, codecs=["zstd", "age"])
    fields: dict[str, object] = dict(
        name=name, target="main", created_at=STARTED,
        finished_at=STARTED + timedelta(seconds=3), size_bytes=10, sha256=SHA, raw_bytes=40,
        chain=[{"codec": "zstd", "level": 3},
               {"codec": "age", "recipients": ["sha256:x"], "recipient_keys": ["age1secret"]}],
        destinations={"local": {"status": "stored"}, "offsite": {"status": "failed"}},
        requested_by={"sub": "alice"}, facts={"server_version": "15.4", "rows": {"t": 2}},
        dump=manifests.DumpFacts(duration_s=3.14159, job="j1"))
    fields.update(over)
    return manifests.Manifest(**fields)  # type: ignore[arg-type]


def test_a_built_manifest_passes_the_readers_check_and_keeps_no_key() -> None:
    doc = _manifest().document()
    assert manifests.vet(doc, doc["filename"]) is doc
    assert doc["created_at"] == "2026-12-07T03:04:05.250000Z"
    assert doc["codecs"][1] == {"codec": "age", "recipients": ["sha256:x"]}
    assert "age1secret" not in repr(doc)
    assert doc["compression"] == {"algorithm": "zstd", "level": 3}
    assert doc["encryption"] == {"algorithm": "age", "recipients": ["sha256:x"]}
    assert doc["partial"] is True and doc["duration_s"] == 3.142
    assert doc["rows"] == {"t": 2} and doc["server_version"] == "15.4"
    assert "uploaded_sha256" not in doc and doc["job"] == "j1"


@pytest.mark.parametrize("key", ["sha256", "filename", "engine", "size_bytes", "partial",
                                 "codecs", "damaged"])
def test_engine_facts_can_never_override_a_core_key(key: str) -> None:
    with pytest.raises(ValueError, match="core manifest keys"):
        _manifest(facts={key: "planted"})


def test_a_manifest_is_a_dumps_or_an_uploads_never_both_or_neither() -> None:
    upload = manifests.UploadFacts(uploaded_sha256=SHA, validated=True,
                                   original_filename="x.sql")
    with pytest.raises(ValueError, match="either"):
        _manifest(upload=upload)
    with pytest.raises(ValueError, match="either"):
        _manifest(dump=None)
    doc = _manifest(dump=None, upload=upload, raw_bytes=None).document()
    assert doc["validated"] is True and doc["original_filename"] == "x.sql"
    assert "raw_bytes" not in doc and "job" not in doc
    assert manifests.vet(doc, doc["filename"]) is doc
