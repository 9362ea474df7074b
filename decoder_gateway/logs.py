"""Logging set-up: plain text or one JSON object per line (LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
import time

from decoder_gateway.errors import StreamAborted


class AbortedStreamFilter(logging.Filter):
    """uvicorn logs an exception that aborts a started response with its traceback;
    for our deliberate StreamAborted, one warning line says enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        while error is not None and not isinstance(error, StreamAborted):
            error = error.__cause__ or error.__context__
        if error is not None:
            record.msg, record.args, record.exc_info = (
                "response aborted mid-stream: %s",
                (str(error),),
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields such as request_id}``."""

    _standard = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (k, v)
            for k, v in record.__dict__.items()
            if k not in self._standard and k != "color_message"
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: str) -> dict:
    """Configure the root logger; returns a uvicorn ``log_config`` that defers to it."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.getLogger("uvicorn.error").addFilter(AbortedStreamFilter())
    root.setLevel(level.upper())
    # uvicorn's loggers propagate to the root handler above, in the same format.
    return {"version": 1, "disable_existing_loggers": False}
