"""How the ``genq`` command shows a job it followed: one summary line, or (``--json``) the whole view.

A view lists every output (about 11,000 lines of JSON for a 1,000-image job), more than a terminal or a script that
waits for a job wants; the line says how it ended and where its manifest is.
"""

from __future__ import annotations

from datetime import datetime

from producer.contract import JobStatus, JobView
from producer.core.clock import utcnow


def summary(view: JobView, now: datetime | None = None) -> str:
    """One line: the job id, its status, what it made (images, or a fine-tune's model), its manifest and how long it
    took from submission to its end (or to ``now`` if it has not ended), e.g.
    ``3b1ba29b66c042218b3b9f594b3e15f2 succeeded: 8/8 images, manifest jobs/3b1b.../manifest.json, 3.4 s``.
    """
    ended = view.finished_at or now or utcnow()
    elapsed = duration((ended - view.created_at).total_seconds())
    if view.kind == "finetune":
        model = view.training.model if view.training is not None else None
        made = f"model {model}" if model else "no model published"
    else:
        total = f"/{view.progress.total}" if view.progress.total else ""
        made = f"{view.progress.done}{total} images"
        if view.manifest_key:
            made += f", manifest {view.manifest_key}"
        elif view.status is JobStatus.SUCCEEDED:
            made += ", manifest in its record"  # a job of one image stores its image alone
        else:
            made += ", no manifest"
        made += f", sheet {view.sheet_key}" if view.sheet_key else ""
    line = f"{view.id} {view.status.value}: {made}, {elapsed}"
    if view.error is not None:
        line += f" ({view.error.type})"
    return line


def duration(seconds: float) -> str:
    """``3.4 s``, ``2 min 5 s``, ``1 h 3 min``: a length of time as a person reads it."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"
