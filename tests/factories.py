"""Small builders of contract objects shared by tests."""

from __future__ import annotations

from producer.contract import OutputRef


def output_refs(indices: range, prefix: str = "jobs/job-0001/") -> list[OutputRef]:
    """Stored-output records of a job's images ``indices`` (labelled "bag"), as a worker reports them."""
    return [
        OutputRef(
            index=i,
            label="bag",
            label_index=8,
            seed=i,
            key=f"{prefix}{i:05d}.png",
            sha256=f"{i:064x}",
            content_type="image/png",
        )
        for i in indices
    ]
