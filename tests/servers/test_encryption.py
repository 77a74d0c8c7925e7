"""age encryption and zstd: backups only offline keys can read, readable by the stock
`age` and `zstd` tools, a wrong key refused before anything is dropped, and encryption that
cannot be set up failing the backup rather than writing it in the clear."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyrage
import pytest

from api.app import create_app
from shared.config import Settings, parse_settings
from tests import pg
from tests.conftest import bearer, make_raw_config
from tests.helpers import (
    backup,
    form,
    restore,
    restore_twice_unchanged,
    running_worker,
    stored_bytes,
    stored_manifest,
)


def keypair() -> tuple[str, str]:
    ident = pyrage.x25519.Identity.generate()
    return str(ident), str(ident.to_public())


OPS = keypair()
ESCROW = keypair()
STRANGER = keypair()


def encrypted_settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str],
                       *, identity: str | None = OPS[0], **encryption: Any) -> Settings:
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    enc: dict[str, Any] = {"recipients": [OPS[1], ESCROW[1]], **encryption}
    if identity is not None:
        (tmp_path / "ops-key.txt").write_text(f"# ops\n{identity}\n")
        enc["identity_file"] = "ops-key.txt"
    raw["targets"]["main"].update(compression="zstd", encryption=enc)
    return parse_settings(raw, test_env, base=tmp_path, source="<test>")


@pytest.fixture
def settings(prefix: str, tmp_path: Path, pg_db: str, test_env: dict[str, str]) -> Settings:
    return encrypted_settings(prefix, tmp_path, pg_db, test_env)


def stock_decrypt(path: Path, key: str, tmp_path: Path) -> bytes:
    """`age -d -i key.txt f.sql.zst.age | zstd -d`, as the README's recovery recipe."""
    if shutil.which("age") is None or shutil.which("zstd") is None:
        pytest.fail("stock `age` and `zstd` are needed (scripts/test.sh installs them)")
    keyfile = tmp_path / "stock-key.txt"
    keyfile.write_text(key + "\n")
    out = subprocess.run(f"age -d -i {keyfile} {path} | zstd -d -q", shell=True,
                         capture_output=True, check=True)
    return out.stdout


async def test_encrypted_zstd_round_trip_readable_by_stock_tools(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, tmp_path: Path) -> None:
    """dump → zstd → age: names end .zst.age, the manifest lists fingerprints (never
    keys), both the ops and the escrow key open it with stock tools, and it restores."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    result = (await backup(api))["result"]
    name = result["filename"]
    assert name.endswith(".sql.zst.age") and result["codecs"] == ["zstd", "age"]
    manifest = await stored_manifest(storage_dir, name)
    assert [c["codec"] for c in manifest["codecs"]] == ["zstd", "age"]
    fps = manifest["encryption"]["recipients"]
    assert len(fps) == 2 and all(f.startswith("sha256:") for f in fps)
    text = json.dumps(manifest)
    assert "age1" not in text and "AGE-SECRET" not in text
    stored = await stored_bytes(storage_dir, name)
    assert stored.startswith(b"age-encryption.org/v1\n") and b"CREATE TABLE" not in stored
    for key in (OPS[0], ESCROW[0]):
        plain = stock_decrypt(storage_dir / name, key, tmp_path)
        assert b"PostgreSQL database dump" in plain and len(plain) == result["raw_bytes"]
    conn = await pg.user_conn(pg_db)
    await conn.execute("DROP TABLE events CASCADE; DELETE FROM everything")
    await conn.close()
    await restore_twice_unchanged(api, name, lambda: pg.fingerprint(pg_db), before)
    safety = [b for b in (await (await api.get("/api/v1/targets/main/backups")).json())
              ["backups"] if b["kind"] == "safety_backup"]
    assert safety and all(b["filename"].endswith(".zst.age") for b in safety)


async def test_wrong_identity_is_refused_before_anything_is_dropped(
        api: Any, settings: Settings, prefix: str, pg_db: str, tmp_path: Path,
        test_env: dict[str, str]) -> None:
    """A worker holding the wrong key fails the restore at verification: no safety backup,
    no clean, the database exactly as it was."""
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        name = (await backup(api))["result"]["filename"]
    conn = await pg.user_conn(pg_db)
    await conn.execute("DELETE FROM everything WHERE id < 50")
    await conn.close()
    damaged = await pg.fingerprint(pg_db)
    wrong = encrypted_settings(prefix, tmp_path, pg_db, test_env, identity=STRANGER[0])
    async with running_worker(wrong):
        # with a safety backup: refused up front, since a rollback could not decrypt it
        job = await restore(api, name)
        assert job["status"] == "failed" and job["error"]["code"] == "identity_required", job
        assert "rollback" in job["error"]["message"]
        # without: verification decrypts the first block and refuses
        job = await restore(api, name, create_safety_backup=False)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "wrong_identity", job
    assert job["error"]["database_state"] == "unchanged"
    assert await pg.fingerprint(pg_db) == damaged
    listed = (await (await api.get("/api/v1/targets/main/backups")).json())["backups"]
    assert [b["filename"] for b in listed] == [name]  # no safety backup was taken


@pytest.mark.parametrize("encryption, why", [
    ({"recipients": ["age1thisisnotakey"]}, "could not be loaded"),
    ({"recipients": [], "recipients_file": "missing-recipients.txt"}, "cannot be read"),
])
async def test_encryption_that_cannot_be_set_up_fails_the_backup(
        aiohttp_client: Any, redis: Any, prefix: str, pg_db: str, tmp_path: Path,
        test_env: dict[str, str], encryption: dict[str, Any], why: str) -> None:
    """Never written unencrypted (WAL-G CVE-2021-38599): the backup fails, nothing stored."""
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["encryption"] = encryption
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        job = await (await api.post("/api/v1/targets/main/backups?wait=60", json={})).json()
    assert job["status"] == "failed" and job["error"]["code"] == "encryption_unavailable", job
    assert why in job["error"]["message"]
    assert "age1thisisnotakey" not in job["error"]["message"]
    d = tmp_path / "backups" / "main"
    assert not d.exists() or list(d.iterdir()) == []


async def test_old_gzip_manifests_still_restore(
        aiohttp_client: Any, redis: Any, prefix: str, pg_db: str, tmp_path: Path,
        test_env: dict[str, str]) -> None:
    """A backup whose manifest predates codec chains (`compression: {algorithm: gzip}`, no
    `codecs`) restores; so does a plain one (`compression: null`)."""
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        before = await pg.fingerprint(pg_db)
        names = [(await backup(api, compress=c))["result"]["filename"] for c in (True, False)]
        d = tmp_path / "backups" / "main"
        for name, old in zip(names, ({"algorithm": "gzip", "implementation": "isal",
                                      "level": 1}, None), strict=True):
            man = json.loads((d / f"{name}.json").read_text())
            for key in ("codecs", "destinations", "partial"):
                man.pop(key)
            man["compression"] = old
            (d / f"{name}.json").write_text(json.dumps(man))
        conn = await pg.user_conn(pg_db)
        await conn.execute("DROP TABLE events CASCADE")
        await conn.close()
        for name in names:
            job = await restore(api, name, create_safety_backup=False)
            assert job["status"] == "succeeded", job.get("error")
            assert await pg.fingerprint(pg_db) == before


async def test_encrypted_uploads(api: Any, worker: Any, pg_db: str, storage_dir: Path,
                                 tmp_path: Path) -> None:
    """An .age upload the server can open is validated like any other; one encrypted to a
    key it does not hold is accepted unverified, says so, and is refused at restore time
    before anything is dropped."""
    await pg.load_rich(pg_db)
    name = (await backup(api))["result"]["filename"]
    plain = stock_decrypt(storage_dir / name, OPS[0], tmp_path)
    import zstandard

    inner = zstandard.ZstdCompressor().compress(plain)
    mine = pyrage.encrypt(inner, [pyrage.x25519.Recipient.from_str(OPS[1])])
    resp = await api.post("/api/v1/targets/main/uploads", data=form(mine, "x.sql.zst.age"))
    up = await resp.json()
    assert resp.status == 201, up
    assert up["validated"] is True and [c["codec"] for c in up["codecs"]] == ["zstd", "age"]
    assert up["filename"].endswith(".sql.zst.age")
    hostile = pyrage.encrypt(b"\\! rm -rf /\n", [pyrage.x25519.Recipient.from_str(OPS[1])])
    resp = await api.post("/api/v1/targets/main/uploads", data=form(hostile, "h.sql.age"))
    assert resp.status == 400, await resp.text()

    theirs = pyrage.encrypt(inner, [pyrage.x25519.Recipient.from_str(STRANGER[1])])
    resp = await api.post("/api/v1/targets/main/uploads", data=form(theirs, "y.sql.age"))
    opaque = await resp.json()
    assert resp.status == 201 and opaque["validated"] is False, opaque
    assert "unverified" in opaque["note"]
    before = await pg.fingerprint(pg_db)
    job = await restore(api, opaque["filename"])
    assert job["status"] == "failed" and job["error"]["code"] == "wrong_identity", job
    assert job["error"]["database_state"] == "unchanged"
    assert await pg.fingerprint(pg_db) == before
    assert hashlib.sha256(theirs).hexdigest() == opaque["sha256"]


async def test_identity_sent_with_the_restore_is_never_stored(
        api: Any, prefix: str, pg_db: str, tmp_path: Path, test_env: dict[str, str],
        redis: Any) -> None:
    """A worker without an identity file refuses (unchanged); the identity sent with the
    restore opens it. The identity is never in the job record, its events, the audit
    trail or anywhere in Redis in the clear."""
    keyless = encrypted_settings(prefix, tmp_path, pg_db, test_env, identity=None)
    async with running_worker(keyless):
        await pg.load_rich(pg_db)
        before = await pg.fingerprint(pg_db)
        name = (await backup(api))["result"]["filename"]
        conn = await pg.user_conn(pg_db)
        await conn.execute("DROP TABLE events CASCADE")
        await conn.close()
        job = await restore(api, name)
        assert job["status"] == "failed" and job["error"]["code"] == "identity_required", job
        assert job["error"]["database_state"] == "unchanged"
        resp = await api.post("/api/v1/targets/main/restores",
                              json={"backup": name, "identity": "AGE-SECRET-KEY-1NOPE"})
        assert resp.status == 422 and (await resp.json())["error"]["code"] == \
            "invalid_identity"
        job = await restore(api, name, identity=f"# mine\n{OPS[0]}\n")
        assert job["status"] == "succeeded", job.get("error")
    assert await pg.fingerprint(pg_db) == before
    secret = OPS[0].split("-")[-1]
    dumped = []
    async for key in redis.scan_iter(f"{prefix}:*"):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            dumped.append(await redis.get(key))
        elif kind == "hash":
            dumped += list((await redis.hgetall(key)).values())
        elif kind == "stream":
            dumped += [v for _, f in await redis.xrange(key) for v in f.values()]
        elif kind == "list":
            dumped += await redis.lrange(key, 0, -1)
        elif kind == "zset":
            dumped += await redis.zrange(key, 0, -1)
    assert dumped and not any(secret.encode() in (d or b"") for d in dumped)
    assert not [k async for k in redis.scan_iter(f"{prefix}:*sealed_identity*")]


async def test_ssh_ed25519_recipient(aiohttp_client: Any, redis: Any, prefix: str,
                                     pg_db: str, tmp_path: Path,
                                     test_env: dict[str, str]) -> None:
    """An SSH public key works as a recipient, its private key as the identity file, and
    the stock `age -d -i id_ed25519` opens the backup."""
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen is needed (openssh-client; scripts/test.sh installs it)")
    key = tmp_path / "id_ed25519"
    await asyncio.to_thread(subprocess.run, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                                             "-f", str(key)], check=True)
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["targets"]["main"]["encryption"] = {
        "recipients_file": str(key.with_suffix(".pub")), "identity_file": str(key)}
    settings = parse_settings(raw, test_env, base=tmp_path, source="<test>")
    api = await aiohttp_client(create_app(settings), headers=bearer(settings, "admin"))
    async with running_worker(settings):
        await pg.load_rich(pg_db)
        before = await pg.fingerprint(pg_db)
        name = (await backup(api))["result"]["filename"]
        assert name.endswith(".sql.gz.age")
        out = await asyncio.to_thread(
            subprocess.run, f"age -d -i {key} {tmp_path / 'backups' / 'main' / name} "
            "| gunzip -c", shell=True, capture_output=True, check=True)
        assert b"PostgreSQL database dump" in out.stdout
        conn = await pg.user_conn(pg_db)
        await conn.execute("DELETE FROM everything")
        await conn.close()
        job = await restore(api, name)
        assert job["status"] == "succeeded", job.get("error")
    assert await pg.fingerprint(pg_db) == before


async def test_plain_upload_to_an_encrypted_target_is_stored_encrypted(
        api: Any, worker: Any, pg_db: str, storage_dir: Path, tmp_path: Path) -> None:
    """What lands on an encrypted target's destinations is encrypted, uploads included; the
    manifest keeps the uploaded file's checksum too, and it restores."""
    await pg.load_rich(pg_db)
    before = await pg.fingerprint(pg_db)
    name = (await backup(api))["result"]["filename"]
    plain = stock_decrypt(storage_dir / name, OPS[0], tmp_path)
    import gzip

    sent = gzip.compress(plain)
    resp = await api.post("/api/v1/targets/main/uploads", data=form(sent, "mine.sql.gz"))
    up = await resp.json()
    assert resp.status == 201, up
    assert up["filename"].endswith(".sql.gz.age")
    assert [c["codec"] for c in up["codecs"]] == ["gzip", "age"]
    assert up["uploaded_sha256"] == hashlib.sha256(sent).hexdigest() != up["sha256"]
    stored = await stored_bytes(storage_dir, up["filename"])
    assert stored.startswith(b"age-encryption.org/v1\n")
    assert hashlib.sha256(stored).hexdigest() == up["sha256"]
    conn = await pg.user_conn(pg_db)
    await conn.execute("DELETE FROM everything")
    await conn.close()
    job = await restore(api, up["filename"])
    assert job["status"] == "succeeded", job.get("error")
    assert await pg.fingerprint(pg_db) == before
