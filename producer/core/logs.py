"""Logging set-up for genq processes: plain lines for people, or one JSON object per line for log pipelines.

Every record logged while a job runs carries that job's id (``job_id``), taken from a context variable the worker
sets around each job, so logs of one job can be found whichever module wrote them.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("genq_job_id", default=None)

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JobIdFilter(logging.Filter):
    """Adds ``job_id`` (or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = current_job.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job_id, any ``extra`` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Root logging for a genq process (idempotent: replaces the handlers it installed before)."""
    handler = logging.StreamHandler()
    handler.addFilter(JobIdFilter())
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(job_id)s]: %(message)s")
    handler.setFormatter(JsonFormatter() if json_lines else plain)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "_genq", False)]
    handler._genq = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
