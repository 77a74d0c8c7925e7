#!/usr/bin/env python3
"""Which async S3 client: obstore vs aiobotocore, one streamed upload to SeaweedFS each.

The stream is produced chunk by chunk (1 MiB, never whole in memory), as a dump would be.
Each client runs in its own child process so that its peak RSS is its own.

    uv run --with obstore==0.12.1 python bench/s3_clients.py --mib 1024

(obstore is not a dependency of Safehold: `--with` brings it for this comparison only.)
Measured 2026-11-30, 1 GiB, 8 MiB parts, 4 in flight: obstore 156-169 MiB/s, peak RSS
69 MiB; aiobotocore 114-122 MiB/s, peak RSS 149-157 MiB. Safehold uses aiobotocore anyway:
it exposes the upload id (a dead worker's upload is aborted from its job record), abort,
ListMultipartUploads, growing part sizes, Object Lock and SSE parameters; obstore's `put`
hides the upload and warns that failed uploads may be left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MiB = 1 << 20
PART = 8 * MiB


def chunks(total_mib: int):  # type: ignore[no-untyped-def]
    block = os.urandom(MiB)
    for i in range(total_mib):
        yield block[i % 251:] + block[: i % 251]


async def with_obstore(env: dict[str, str], mib: int) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store("bench", endpoint=env["endpoint"], access_key_id=env["ak"],
                    secret_access_key=env["sk"], region="us-east-1",
                    virtual_hosted_style_request=False, client_options={"allow_http": True})

    async def source():  # type: ignore[no-untyped-def]
        for c in chunks(mib):
            yield c
    await obstore.put_async(store, "obstore.bin", source(), chunk_size=PART, max_concurrency=4)


async def with_aiobotocore(env: dict[str, str], mib: int) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client(
            "s3", endpoint_url=env["endpoint"], aws_access_key_id=env["ak"],
            aws_secret_access_key=env["sk"], region_name="us-east-1") as s3:
        up = await s3.create_multipart_upload(Bucket="bench", Key="aiobotocore.bin")
        parts, buf, n = [], bytearray(), 1
        pending: set[asyncio.Task[None]] = set()

        async def send(num: int, body: bytes) -> None:
            r = await s3.upload_part(Bucket="bench", Key="aiobotocore.bin", PartNumber=num,
                                     UploadId=up["UploadId"], Body=body)
            parts.append({"PartNumber": num, "ETag": r["ETag"]})

        for c in chunks(mib):
            buf += c
            if len(buf) >= PART:
                if len(pending) >= 4:
                    _, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                pending.add(asyncio.create_task(send(n, bytes(buf))))
                n += 1
                buf = bytearray()
        if buf:
            pending.add(asyncio.create_task(send(n, bytes(buf))))
        await asyncio.gather(*pending)
        parts.sort(key=lambda p: p["PartNumber"])
        await s3.complete_multipart_upload(Bucket="bench", Key="aiobotocore.bin",
                                           UploadId=up["UploadId"],
                                           MultipartUpload={"Parts": parts})


def child(which: str, env: dict[str, str], mib: int) -> None:
    t0 = time.monotonic()
    asyncio.run({"obstore": with_obstore, "aiobotocore": with_aiobotocore}[which](env, mib))
    wall = time.monotonic() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"client": which, "wall_s": round(wall, 2),
                      "mib_per_s": round(mib / wall, 1), "peak_rss_mib": round(rss, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--child")
    ap.add_argument("--env")
    a = ap.parse_args()
    if a.child:
        child(a.child, json.loads(a.env), a.mib)
        return
    from tests import s3server

    server = s3server.start(Path(tempfile.mkdtemp(prefix="bench-s3-")))
    try:
        asyncio.run(s3server.make_bucket(server, "bench"))
        env = {"endpoint": server.endpoint, "ak": server.access_key, "sk": server.secret_key}
        for which in ("obstore", "aiobotocore", "obstore", "aiobotocore"):
            out = subprocess.run([sys.executable, __file__, "--child", which, "--env",
                                  json.dumps(env), "--mib", str(a.mib)],
                                 capture_output=True, text=True, check=False)
            print(out.stdout.strip() or out.stderr[-2000:])
    finally:
        server.stop()


if __name__ == "__main__":
    main()
