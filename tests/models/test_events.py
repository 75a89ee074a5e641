"""TensorBoard event files of training runs: written when tensorboard is installed, nothing (and no error) without."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cgan
from models.data import LabelledImages
from models.events import EVENTS_PREFIX, RunEvents
from models.train import TrainConfig, train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _data(n: int = 64) -> LabelledImages:
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    images[labels == 0, :, 6:22, 2:12] = 255
    images[labels == 1, :, 6:22, 16:26] = 255
    return LabelledImages(images, labels, ("left", "right"))


def _config(data: LabelledImages) -> cgan.CGANConfig:
    return cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)


def _read(directory: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


class _Killed(Exception):
    """Stands for the process dying mid-run."""


def test_training_writes_losses_learning_rates_grids_and_scores_that_tensorboard_reads(
    tmp_path: Path, one_thread: None
) -> None:
    data = _data()
    cfg = TrainConfig(
        steps=6, batch_size=16, sample_every=3, checkpoint_every=3, eval_every=2, lr_decay_start=0.5,
        bn_recalibration_batches=1,
    )  # fmt: skip
    scored: list[Path] = []

    def scorer(directory: Path) -> dict[str, float]:
        scored.append(directory)
        return {"fid": 10.0 * len(scored), "label_consistency": 0.1 * len(scored)}

    state = train(data, tmp_path, cfg, _config(data), scorer=scorer)
    acc = _read(tmp_path)
    tags = acc.Tags()
    d_loss = acc.Scalars("loss/d")
    assert [e.step for e in d_loss] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in d_loss)
    assert [e.step for e in acc.Scalars("loss/g")] == [1, 2, 3, 4, 5, 6]
    lr_g = [e.value for e in acc.Scalars("lr/g")]
    assert lr_g[:3] == pytest.approx([cfg.lr_g] * 3) and lr_g[3:] == pytest.approx(
        [cfg.lr_g * f for f in (1, 2 / 3, 1 / 3)]
    )
    assert lr_g[-1] == pytest.approx(state.opt_g.param_groups[0]["lr"])
    assert {"lr/d", "ema/decay", "speed/steps_per_s", "d/real_sign"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("eval/fid")] == [(2, 10.0), (4, 20.0), (6, 30.0)]
    assert [e.step for e in acc.Scalars("eval/label_consistency")] == [2, 4, 6]
    grids = acc.Images("samples")
    assert [e.step for e in grids] == [3, 6]
    logged = np.asarray(Image.open(io.BytesIO(grids[-1].encoded_image_string)).convert("L"))
    saved = np.asarray(Image.open(tmp_path / "samples" / "step-000006.png"))
    assert np.array_equal(logged, saved)  # the same grid as the PNG beside it, pixel for pixel
    assert (grids[-1].width, grids[-1].height) == (10 * 30 + 2, 2 * 30 + 2)  # ten seeds a row, one row per class


def test_a_resumed_run_continues_one_curve_without_the_steps_redone(tmp_path: Path, one_thread: None) -> None:
    data = _data()
    cfg = TrainConfig(steps=8, batch_size=16, sample_every=100, checkpoint_every=4, bn_recalibration_batches=1)

    def die_after_6(step: int) -> None:
        if step == 6:
            raise _Killed

    with pytest.raises(_Killed):  # steps 5 and 6 were logged, then lost: the checkpoint holds step 4
        train(data, tmp_path, cfg, _config(data), on_step=lambda s: die_after_6(s.step))
    resumed = train(data, tmp_path, cfg, _config(data))
    assert resumed.step == 8
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(EVENTS_PREFIX)]) == 2
    assert [e.step for e in _read(tmp_path).Scalars("loss/d")] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_without_tensorboard_training_writes_no_events_and_does_not_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # "import" now raises ImportError
    assert not RunEvents.open(tmp_path / "probe").enabled
    data = _data()
    cfg = TrainConfig(steps=2, batch_size=16, sample_every=1, checkpoint_every=2, bn_recalibration_batches=1)
    train(data, tmp_path / "run", cfg, _config(data))
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(EVENTS_PREFIX)]
