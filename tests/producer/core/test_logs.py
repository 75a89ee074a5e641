"""Structured logs: every line written while a job runs carries its id."""

from __future__ import annotations

import io
import json
import logging

from producer.core.logs import JobIdFilter, JsonFormatter, current_job


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"genq.test.{id(stream)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_the_current_job_id_and_extra_fields() -> None:
    logger, stream = _capture(JsonFormatter())
    token = current_job.set("job-42")
    try:
        logger.info("stored %d outputs", 8, extra={"shard": 3})
    finally:
        current_job.reset(token)
    logger.warning("between jobs")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "stored 8 outputs" and first["job_id"] == "job-42" and first["shard"] == 3
    assert first["level"] == "INFO" and first["ts"].endswith("+00:00")
    assert second["job_id"] is None


def test_exceptions_are_kept_in_json() -> None:
    logger, stream = _capture(JsonFormatter())
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    entry = json.loads(stream.getvalue())
    assert "ValueError: boom" in entry["exc"]


def test_plain_lines_show_the_job_id() -> None:
    logger, stream = _capture(logging.Formatter("[%(job_id)s] %(message)s"))
    token = current_job.set("abc")
    logger.info("hello")
    current_job.reset(token)
    assert stream.getvalue().strip() == "[abc] hello"
