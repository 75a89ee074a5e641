"""The one clock genq stamps records with: timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, in UTC (every timestamp genq writes: records, events, dead letters)."""
    return datetime.now(UTC)
