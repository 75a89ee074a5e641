"""Small builders of contract objects shared by tests."""

from __future__ import annotations

from collections.abc import Iterator

from producer.contract import GenerateJob, OutputRef, Shard


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


class RecordingReporter:
    """The pipeline's reporter in memory: the events it was told of, the shards stored, the sheet named."""

    def __init__(self, start: bool = True, succeeds: bool = True) -> None:
        self.start = start
        self.succeeds = succeeds  # False: the job ended (was canceled) before its success
        self.events: list[tuple[str, int]] = []
        self.shards: dict[int, list[OutputRef]] = {}
        self.sheet_key: str | None = None

    def started(self, job: GenerateJob, shard: Shard) -> bool:
        self.events.append(("started", 0))
        return self.start

    def progress(self, job: GenerateJob, shard: Shard, done: int) -> None:
        self.events.append(("progress", done))

    def active(self, job: GenerateJob) -> bool:
        return True

    def awaiting_manifest(self, job: GenerateJob) -> bool:
        return False

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        self.shards[shard.index] = outputs
        return len(self.shards) == shard.count

    def stored_outputs(self, job: GenerateJob, shards: int) -> Iterator[list[OutputRef]]:
        for index in range(shards):
            yield self.shards[index]

    def succeeded(
        self,
        job: GenerateJob,
        first: list[OutputRef],
        total: int,
        manifest_key: str | None,
        sheet_key: str | None = None,
    ) -> bool:
        self.events.append(("succeeded", total))
        self.sheet_key = sheet_key
        self.first = first
        return self.succeeds
