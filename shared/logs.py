"""Logging: text or JSON lines, each carrying the job id and the request id in scope.

The ids live in context variables, set where a request or a job starts; asyncio tasks copy
the context when they are created, so everything a job or request does logs with its id.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

job_id: ContextVar[str | None] = ContextVar("safehold_job_id", default=None)
request_id: ContextVar[str | None] = ContextVar("safehold_request_id", default=None)


class _Ids(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = job_id.get()
        record.request = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        for key in ("job", "request"):
            if value := getattr(record, key, None):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(f"{k}={v}" for k in ("job", "request")
                       if (v := getattr(record, k, None)))
        return f"{text} [{ids}]" if ids else text


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request its parser refuses (a NUL in a header, a broken request line)
    at ERROR with a traceback, though the client was answered 400 and nothing failed here:
    anyone could flood the error log so. One INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and any(c.__name__ == "HttpProcessingError"
                                   for c in type(exc).__mro__):
            first = str(getattr(exc, "message", "") or exc).strip().splitlines()[:1]
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "malformed HTTP request refused with %s: %s"
            record.args = (getattr(exc, "code", 400), first[0][:200] if first else "")
            record.exc_info = record.exc_text = None
        return True


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Ids())
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server.filters):
        server.addFilter(_MalformedRequests())
