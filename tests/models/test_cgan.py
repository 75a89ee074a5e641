"""The cGAN: deterministic sampling, exact weight round trips, training that learns and resumes exactly."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_model

from models import cgan
from models.data import FASHION_MNIST_CLASSES, LabelledImages, read_idx
from models.errors import DatasetError, InvalidModelConfig, WeightsError
from models.generator import WEIGHTS_FILE, load_generator, save_generator
from models.train import TrainConfig, load_checkpoint, lr_scale_at, mode_seeking_penalty, train, train_step_aug


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("zoo"))


def test_one_image_alone_equals_the_same_image_inside_a_batch_of_64(tiny_dir: Path) -> None:
    model = load_generator(tiny_dir)
    labels = [i % 10 for i in range(64)]
    seeds = [1000 + i for i in range(64)]
    batch = model.sample(labels, seeds)  # (64, 1, 28, 28)
    alone = torch.cat([model.sample([label], [seed]) for label, seed in zip(labels, seeds, strict=True)])
    assert torch.equal(alone, batch)  # byte for byte, every image


def test_sampling_is_repeatable_and_seed_dependent(tiny_dir: Path) -> None:
    model = load_generator(tiny_dir)
    a, b = model.sample([7, 7], [1, 2]), model.sample([7, 7], [1, 2])
    assert a.dtype == torch.uint8 and a.shape == (2, 1, 28, 28)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_label_changes_the_image(tiny_dir: Path) -> None:
    model = load_generator(tiny_dir)
    images = model.sample([0, 9], [5, 5])
    assert not torch.equal(images[0], images[1])


def test_sample_refuses_out_of_range_labels_and_mismatched_lengths(tiny_dir: Path) -> None:
    model = load_generator(tiny_dir)
    with pytest.raises(ValueError, match="out of range"):
        model.sample([10], [1])
    with pytest.raises(ValueError, match="2 labels but 1 seeds"):
        model.sample([1, 2], [1])


def test_weights_round_trip_through_safetensors_exactly(tmp_path: Path) -> None:
    config = cgan.CGANConfig(class_names=("a", "b", "c"), resolution=32, channels=3, g_ch=4, d_ch=4)
    net = cgan.Generator(config)
    save_generator(tmp_path, config, net)
    loaded = load_generator(tmp_path)
    assert loaded.resolution == 32 and loaded.channels == 3 and loaded.class_names == ("a", "b", "c")
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    for key, value in net.state_dict().items():
        assert torch.equal(stored[key], value), key
    assert loaded.sample([2], [3]).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("resolution", [28, 32, 64])
def test_every_resolution_builds_matching_generator_and_discriminator(resolution: int) -> None:
    config = cgan.CGANConfig(class_names=("a", "b"), resolution=resolution, channels=3, g_ch=4, d_ch=4)
    z, y = torch.randn(2, config.z_dim), torch.tensor([0, 1])
    images = cgan.Generator(config)(z, y)
    assert images.shape == (2, 3, resolution, resolution)
    assert cgan.Discriminator(config)(images, y).shape == (2,)


def test_corrupt_or_mismatched_weights_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text().replace('"g_ch": 4', '"g_ch": 8'))
    (tmp_path / WEIGHTS_FILE).write_bytes((tiny_dir / WEIGHTS_FILE).read_bytes())
    with pytest.raises(WeightsError):
        load_generator(tmp_path)  # shapes do not match the config
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError):
        load_generator(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolution": 48},
        {"channels": 2},
        {"class_names": ()},
        {"class_names": ("a", "a")},
        {"attention": 28},
        {"attention": 7},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"class_names": ("a", "b"), **kwargs}
    with pytest.raises(InvalidModelConfig):
        cgan.CGANConfig(**fields)  # type: ignore[arg-type]


def _synthetic_data(n: int = 256) -> LabelledImages:
    """Two easy classes: a bright square on the left or on the right."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    images[labels == 0, :, 6:22, 2:12] = 255
    images[labels == 1, :, 6:22, 16:26] = 255
    return LabelledImages(images, labels, ("left", "right"))


def test_short_training_lowers_the_discriminator_loss_and_exports_a_loadable_model(tmp_path: Path) -> None:
    data = _synthetic_data()
    losses: list[float] = []
    cfg = TrainConfig(
        steps=60, batch_size=32, ema_start=0, sample_every=30, checkpoint_every=30, bn_recalibration_batches=2
    )
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=8, d_ch=8)
    train(data, tmp_path, cfg, config, on_step=lambda s: losses.append(s.d_loss))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    model = load_generator(tmp_path / "export")
    assert model.sample([0, 1], [1, 1]).shape == (2, 1, 28, 28)
    assert (tmp_path / "samples" / "step-000060.png").is_file()


def test_resume_continues_exactly_where_training_stopped(tmp_path: Path) -> None:
    data = _synthetic_data(128)
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)
    half = TrainConfig(steps=4, batch_size=16, sample_every=100, checkpoint_every=2, bn_recalibration_batches=1)
    full = TrainConfig(steps=8, batch_size=16, sample_every=100, checkpoint_every=2, bn_recalibration_batches=1)
    logs: list[str] = []
    train(data, tmp_path / "a", half, config)
    resumed = train(data, tmp_path / "a", full, config, on_log=logs.append)
    straight = train(data, tmp_path / "b", full, config)
    assert logs[0] == "resuming from step 4: 4 of 8 steps remaining"
    assert logs[-1].startswith("step 8/8: ")
    for (key, a), b in zip(resumed.ema.state_dict().items(), straight.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    state, _ = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors", full)
    assert state.step == 8


def _small_export(tmp_path: Path, data: LabelledImages) -> tuple[Path, cgan.CGANConfig]:
    """A 2-class base exported by training (EMA G + discriminator.safetensors), to warm-start from."""
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)
    cfg = TrainConfig(steps=3, batch_size=16, sample_every=100, checkpoint_every=3, bn_recalibration_batches=1)
    train(data, tmp_path / "base", cfg, config)
    return tmp_path / "base" / "export", config


def test_lr_is_constant_then_falls_linearly_to_a_last_small_step() -> None:
    cfg = TrainConfig(steps=10, lr_decay_start=0.6)
    scales = [lr_scale_at(step, cfg) for step in range(10)]  # the update that makes step + 1
    assert scales == [1.0] * 6 + [1.0, 0.75, 0.5, 0.25]
    assert [lr_scale_at(step, TrainConfig(steps=10)) for step in range(10)] == [1.0] * 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr_decay_start": 1.5},
        {"lr_decay_start": -0.1},
        {"d_warmup_steps": -1},
        {"d_steps": 0},
        {"mode_seeking": -0.5},
        {"mode_seeking": 1.0, "batch_size": 15},
        {"consistency": -1.0},
        {"consistency": 10.0, "augment": ("translation",)},
    ],
)
def test_bad_train_configs_are_refused_naming_the_field(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidModelConfig, match=next(iter(kwargs))):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_a_d_only_step_leaves_g_untouched_and_trains_d(tmp_path: Path) -> None:
    data = _synthetic_data(64)
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)
    from models.train import new_state

    state = new_state(config, TrainConfig())
    g_before = {k: v.clone() for k, v in state.g.state_dict().items() if "running" not in k and "num_b" not in k}
    d_before = {k: v.clone() for k, v in state.d.state_dict().items()}
    real = data.images[:16].float() / 127.5 - 1.0
    train_step_aug(state, real, data.labels[:16], TrainConfig(), update_g=False)
    g_after = state.g.state_dict()
    assert all(torch.equal(v, g_after[k]) for k, v in g_before.items())
    assert any(not torch.equal(v, state.d.state_dict()[k]) for k, v in d_before.items())


def test_extra_d_steps_update_d_once_per_batch_and_g_once() -> None:
    data = _synthetic_data(64)
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)
    from models.train import new_state

    real = data.images[:32].float() / 127.5 - 1.0
    batches = [(real[:16], data.labels[:16]), (real[16:], data.labels[16:32])]
    one, two = new_state(config, TrainConfig()), new_state(config, TrainConfig())
    d_steps_seen: list[int] = []
    two.opt_d.register_step_post_hook(lambda *_: d_steps_seen.append(1))
    g_steps_seen: list[int] = []
    two.opt_g.register_step_post_hook(lambda *_: g_steps_seen.append(1))
    train_step_aug(one, *batches[1], TrainConfig())
    train_step_aug(two, *batches[1], TrainConfig(), extra_d=batches[:1])
    assert (len(d_steps_seen), len(g_steps_seen), two.step) == (2, 1, 1)  # steps count G's updates
    assert any(not torch.equal(v, two.d.state_dict()[k]) for k, v in one.d.state_dict().items())


@pytest.mark.parametrize("option", [{"d_steps": 2}, {"mode_seeking": 1.0}, {"consistency": 10.0}])
def test_resume_with_an_option_is_exact_and_differs_from_without(tmp_path: Path, option: dict[str, float]) -> None:
    data = _synthetic_data(128)
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)
    cfg = TrainConfig(steps=6, batch_size=16, sample_every=100, checkpoint_every=2, bn_recalibration_batches=1)
    cfg = dataclasses.replace(cfg, **option)
    with pytest.raises(_Killed):  # dies after step 3, between the checkpoints of steps 2 and 4
        train(data, tmp_path / "a", cfg, config, on_step=lambda s: _kill_at(s.step, 3))
    resumed = train(data, tmp_path / "a", cfg, config)
    straight = train(data, tmp_path / "b", cfg, config)
    default = train(
        data, tmp_path / "c", dataclasses.replace(cfg, d_steps=1, mode_seeking=0.0, consistency=0.0), config
    )
    for (key, a), b in zip(resumed.ema.state_dict().items(), straight.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert any(not torch.equal(v, default.d.state_dict()[k]) for k, v in straight.d.state_dict().items())


def test_mode_seeking_penalty_falls_as_a_class_s_two_images_move_apart() -> None:
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))  # (B, z_dim); rows i and i + 4 pair
    base = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))  # (B/2, C, H, W)
    penalties = [float(mode_seeking_penalty(torch.cat([base, base + gap]), z)) for gap in (0.0, 0.1, 0.5)]
    assert penalties[0] > 1e4  # one mode for both latents: 1 / eps
    latent_gap = float((z[:4] - z[4:]).abs().mean())
    assert penalties[1:] == pytest.approx([latent_gap / 0.1, latent_gap / 0.5], rel=1e-3)


def test_mode_seeking_pairs_each_class_and_changes_g_s_update() -> None:
    data = _synthetic_data(64)
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)
    from models.train import _fake_batch, new_state

    state = new_state(config, TrainConfig())
    _, y, z = _fake_batch(state, 16, torch.device("cpu"), paired=True)
    assert torch.equal(y[:8], y[8:]) and not torch.equal(z[:8], z[8:])
    real, labels = data.images[:16].float() / 127.5 - 1.0, data.labels[:16]
    off, on = new_state(config, TrainConfig()), new_state(config, TrainConfig(mode_seeking=1.0))
    train_step_aug(off, real, labels, TrainConfig())
    train_step_aug(on, real, labels, TrainConfig(mode_seeking=1.0))
    assert any(not torch.equal(v, on.g.state_dict()[k]) for k, v in off.g.state_dict().items())


def test_consistency_adds_d_s_gap_to_the_shifted_batch_and_leaves_g_s_loss_alone() -> None:
    data = _synthetic_data(64)
    config = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=4, d_ch=4)
    from models.train import _augmenter, new_state

    real, labels = data.images[:16].float() / 127.5 - 1.0, data.labels[:16]
    off, on = new_state(config, TrainConfig()), new_state(config, TrainConfig(consistency=10.0))
    shift = _augmenter(("translation",), torch.Generator().manual_seed(1))
    calls: list[int] = []
    on.d.register_forward_hook(lambda *_: calls.append(1))
    plain = train_step_aug(off, real, labels, TrainConfig())
    regularised = train_step_aug(on, real, labels, TrainConfig(consistency=10.0), shift=shift)
    # D judges reals, fakes, both shifted, then G's fakes: 5 calls, against 3 without the term
    assert len(calls) == 5
    assert regularised.d_loss > plain.d_loss  # the same batches, G and D: the hinge part is equal, the gap adds
    assert any(not torch.equal(v, on.d.state_dict()[k]) for k, v in off.d.state_dict().items())
    with pytest.raises(ValueError, match="shift"):
        train_step_aug(new_state(config, TrainConfig()), real, labels, TrainConfig(consistency=10.0))


def test_without_mode_seeking_a_fake_batch_draws_as_before_the_term_existed() -> None:
    config = cgan.CGANConfig(class_names=("a", "b", "c"), z_dim=8, g_ch=4, d_ch=4)
    from models.train import _fake_batch, new_state

    _, y, z = _fake_batch(new_state(config, TrainConfig()), 16, torch.device("cpu"))
    rng = torch.Generator().manual_seed(TrainConfig().seed)  # b latents, then b classes, from the state's rng
    assert torch.equal(z, torch.randn(16, 8, generator=rng))
    assert torch.equal(y, torch.randint(0, 3, (16,), generator=rng))


def test_warm_start_begins_from_the_published_g_and_d(tmp_path: Path) -> None:
    data = _synthetic_data(64)
    base, config = _small_export(tmp_path, data)
    cfg = TrainConfig(steps=1, batch_size=16, d_warmup_steps=1, sample_every=100, bn_recalibration_batches=1)
    logs: list[str] = []
    state = train(data, tmp_path / "warm", cfg, resume=False, init_from=base, on_log=logs.append)
    stored = load_file(str(base / WEIGHTS_FILE))
    weights = {k: v for k, v in state.g.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert weights and all(torch.equal(v, stored[k]) for k, v in weights.items())  # one D-only step: G as stored
    assert logs[0] == f"training from {base}'s weights: 1 steps"
    fresh = train(data, tmp_path / "fresh", cfg, config, resume=False)
    assert any(not torch.equal(v, fresh.g.state_dict()[k]) for k, v in weights.items())


def test_warm_start_refuses_a_model_of_another_configuration(tmp_path: Path) -> None:
    data = _synthetic_data(64)
    base, config = _small_export(tmp_path, data)
    from models.train import new_state, warm_start

    other = cgan.CGANConfig(class_names=data.class_names, z_dim=8, g_ch=8, d_ch=4)
    with pytest.raises(InvalidModelConfig, match="not a cgan with this configuration"):
        warm_start(new_state(other, TrainConfig()), other, base)


def test_resume_with_warm_start_d_warmup_and_lr_decay_is_exact(tmp_path: Path) -> None:
    data = _synthetic_data(128)
    base, _ = _small_export(tmp_path, data)
    cfg = TrainConfig(
        steps=8,
        batch_size=16,
        d_warmup_steps=2,
        lr_decay_start=0.5,
        sample_every=100,
        checkpoint_every=2,
        bn_recalibration_batches=1,
    )
    with pytest.raises(_Killed):  # dies after step 5, between the checkpoints of steps 4 and 6
        train(data, tmp_path / "a", cfg, init_from=base, on_step=lambda s: _kill_at(s.step, 5))
    resumed = train(data, tmp_path / "a", cfg, init_from=base)
    straight = train(data, tmp_path / "b", cfg, init_from=base)
    for (key, a), b in zip(resumed.ema.state_dict().items(), straight.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert resumed.opt_g.param_groups[0]["lr"] == straight.opt_g.param_groups[0]["lr"] == cfg.lr_g / 4


class _Killed(Exception):
    """Stands for the process dying mid-run."""


def _kill_at(step: int, stop: int) -> None:
    if step == stop:
        raise _Killed


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def test_idx_reader_round_trips_and_checks_the_payload(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", array)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), array)
    with gzip.open(tmp_path / "short.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 2]) + struct.pack(">2I", 5, 5) + b"\x00" * 3)
    with pytest.raises(DatasetError, match="payload"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        read_idx(tmp_path / "missing.gz")


def test_fashion_mnist_class_slugs() -> None:
    assert FASHION_MNIST_CLASSES[7] == "sneaker" and len(FASHION_MNIST_CLASSES) == 10


@pytest.mark.parametrize(("resolution", "side"), [(28, 14), (32, 16), (64, 32), (64, 8)])
def test_self_attention_starts_as_the_identity_and_keeps_images_independent_of_their_batch(
    resolution: int, side: int
) -> None:
    torch.manual_seed(0)
    cfg = cgan.CGANConfig(class_names=("a", "b"), resolution=resolution, attention=side, z_dim=8, g_ch=4, d_ch=4)
    g, d = cgan.Generator(cfg).eval(), cgan.Discriminator(cfg)
    assert g.attn is not None and d.attn is not None
    x = torch.randn(2, g.attn.out.in_channels * 2, side, side)
    assert torch.equal(g.attn(x), x)  # gamma = 0: the block adds nothing until it learns to
    with torch.no_grad():
        g.attn.gamma.fill_(0.5)
    z, y = torch.randn(5, 8), torch.tensor([0, 1, 0, 1, 1])
    batch = g(z, y)  # (5, 1, R, R)
    assert batch.shape == (5, 1, resolution, resolution) and d(batch, y).shape == (5,)
    assert torch.allclose(g(z[3:4], y[3:4]), batch[3:4], atol=1e-5)  # attention mixes positions, never samples


def test_self_attention_learns_through_a_training_step() -> None:
    from models.train import new_state, train_step

    cfg = cgan.CGANConfig(class_names=("left", "right"), attention=14, z_dim=8, g_ch=4, d_ch=4)
    state = new_state(cfg, TrainConfig(seed=0))
    data = _synthetic_data(16)
    train_step(state, data.images.float() / 127.5 - 1.0, data.labels, TrainConfig())
    assert state.g.attn is not None and state.d.attn is not None
    assert state.g.attn.gamma.item() != 0.0 and state.d.attn.gamma.item() != 0.0
