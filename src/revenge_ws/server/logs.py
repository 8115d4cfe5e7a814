"""Logging setup: plain or JSON lines, and an access log that never shows a query string.

Query strings are dropped from every logged path because ``?token=`` carries credentials.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from ..config import LoggingSettings

__all__ = ["AccessLogger", "JsonFormatter", "configure_logging", "log_access"]

_STD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def log_access(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    method: str,
    path: str,
    status: int,
    seconds: float,
    remote: str | None,
) -> None:
    """One access line; ``path`` must not carry the query string."""
    logger.info(
        "%s %s %s %.4fs",
        method,
        path,
        status,
        seconds,
        extra={
            "event": "access",
            "method": method,
            "path": path,
            "status": status,
            "duration": round(seconds, 6),
            "remote": remote,
        },
    )


class AccessLogger(AbstractAccessLogger):
    """``METHOD /path STATUS seconds`` — the path without its query string."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        log_access(self.logger, request.method, request.path, response.status, time, request.remote)


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    logging.getLogger("aiohttp.access").disabled = not settings.access_log
