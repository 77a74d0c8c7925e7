"""Log lines carry the job and request ids in scope; JSON lines are one object each."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from shared import logs


async def test_json_lines_carry_job_and_request_ids(capsys: Any, restore_logging: Any
                                                    ) -> None:
    logs.setup("info", "json")
    log = logging.getLogger("safehold.test")

    async def job() -> None:
        logs.job_id.set("1a2b-job")
        log.info("working")
        await asyncio.create_task(child())

    async def child() -> None:
        log.warning("from a task the job started")

    async def request() -> None:
        logs.request_id.set("req-42")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    await asyncio.gather(asyncio.create_task(job()), asyncio.create_task(request()))
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    by_message = {d["message"]: d for d in lines}
    assert by_message["working"]["job"] == "1a2b-job"
    assert by_message["from a task the job started"]["job"] == "1a2b-job"
    assert by_message["failed"]["request"] == "req-42" and "job" not in by_message["failed"]
    assert "ValueError: boom" in by_message["failed"]["exception"]
    assert "job" not in by_message["outside"] and by_message["outside"]["level"] == "info"


async def test_text_lines_append_the_ids(capsys: Any, restore_logging: Any) -> None:
    logs.setup("info", "text")

    async def job() -> None:
        logs.job_id.set("j-7")
        logging.getLogger("safehold.test").info("hello")

    await asyncio.create_task(job())
    assert capsys.readouterr().err.rstrip().endswith("hello [job=j-7]")


