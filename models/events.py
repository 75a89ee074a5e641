"""TensorBoard event files for training runs, written only when the optional ``tensorboard`` package is installed.

``genq train`` and fine-tunes log through a :class:`RunEvents`: losses, learning rates and speed every step, sample
grids as images, evaluation scores when they are measured. Without ``tensorboard`` (``pip install 'genq[tensorboard]'``)
every call is a no-op, so training never depends on it.

A resumed run opens its writer with ``purge_step`` = the first step it logs (one past its checkpoint's): TensorBoard
then drops what the earlier process logged from that step on (the steps redone after a crash): one line per curve.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

EVENTS_PREFIX = "events.out.tfevents."  # how TensorBoard names its files; a fine-tune uploads the ones it wrote


class RunEvents:
    """A TensorBoard ``SummaryWriter`` for one training process, or nothing (every method a no-op)."""

    def __init__(self, writer: Any | None = None) -> None:
        self._writer = writer
        self._directory = Path(writer.get_logdir()) if writer is not None else None

    @classmethod
    def open(cls, directory: Path, purge_step: int | None = None) -> RunEvents:
        """Events in ``directory`` (created), or a no-op log when ``tensorboard`` is not installed.

        Args:
            purge_step: the first step a resumed run logs; earlier files' events at or past it are hidden.
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package (the optional extra)
            return cls(None)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(SummaryWriter(log_dir=str(directory), purge_step=purge_step or None))

    @property
    def enabled(self) -> bool:
        """True when events are written."""
        return self._writer is not None

    @property
    def files(self) -> list[Path]:
        """The event files in the writer's folder, also after :meth:`close` (after :meth:`flush`: complete so far)."""
        if self._directory is None:
            return []
        return sorted(self._directory / n for n in os.listdir(self._directory) if n.startswith(EVENTS_PREFIX))

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """One point per tag at ``step`` (tags like ``loss/d``); None values are skipped."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """A uint8 image (C, H, W), e.g. a sample grid with one row per class."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="CHW")

    def flush(self) -> None:
        """Write everything pending to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the file; later calls are no-ops."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
