"""Fine-tuning a published cGAN: class rows carried over by name, FreezeD, augmentation, exact resume, export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import cgan, cvae
from models.augment import AugmentConfig
from models.data import LabelledImages
from models.errors import DatasetError, InvalidModelConfig
from models.finetune import FineTuneConfig, FineTuner, init_from_base
from models.generator import CONFIG_FILE, WEIGHTS_FILE, load_generator, save_generator
from models.train import DISCRIMINATOR_FILE, TrainConfig, export, new_state, train_step

BASE_CLASSES = ("a", "b", "c")
CLASSES = ("b", "new1")
EMBED = "embed.parametrizations.weight.original"
CFG = FineTuneConfig(steps=4, batch_size=8, bn_recalibration_batches=1)


def _images(n: int, classes: int, side: int = 28, channels: int = 1, seed: int = 0) -> LabelledImages:
    rng = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, side, side), generator=rng, dtype=torch.uint8)
    return LabelledImages(images, torch.arange(n) % classes, tuple(BASE_CLASSES[:classes]))


def _data(side: int = 28, channels: int = 1) -> LabelledImages:
    data = _images(12, 2, side, channels, seed=1)
    return LabelledImages(data.images, data.labels, CLASSES)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cGAN trained 3 steps, with distinct class rows, exported like a published model."""
    model_cfg = cgan.CGANConfig(class_names=BASE_CLASSES, z_dim=8, g_ch=4, d_ch=4)
    cfg = TrainConfig(batch_size=8, ema_start=0)
    state = new_state(model_cfg, cfg)
    with torch.no_grad():  # class rows that differ, so that copying the wrong one shows
        for module in state.g.modules():
            if isinstance(module, cgan.ConditionalBatchNorm2d):
                module.gain.weight.normal_(1.0, 0.5)
                module.bias.weight.normal_(0.0, 0.5)
    data = _images(16, 3)
    for _ in range(3):
        idx = torch.randint(0, len(data), (8,), generator=state.rng)
        train_step(state, data.images[idx].float() / 127.5 - 1.0, data.labels[idx], cfg)
    state.ema.load_state_dict(state.g.state_dict())
    directory = tmp_path_factory.mktemp("base")
    export(state, model_cfg, directory, bn_batches=1)
    return directory


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_export_writes_the_discriminator_beside_the_generator(base_dir: Path) -> None:
    assert {p.name for p in base_dir.iterdir()} == {WEIGHTS_FILE, CONFIG_FILE, DISCRIMINATOR_FILE}
    assert load_generator(base_dir).class_names == BASE_CLASSES


def test_known_classes_copy_their_rows_and_new_classes_start_from_the_mean_in_g_and_fresh_in_d(
    base_dir: Path,
) -> None:
    state, model_cfg, mapping = init_from_base(base_dir, CLASSES, CFG)
    assert model_cfg.class_names == CLASSES and model_cfg.z_dim == 8
    assert mapping.reused == {"b": 1} and mapping.new == ("new1",)
    base_g, base_d = _weights(base_dir / WEIGHTS_FILE), _weights(base_dir / DISCRIMINATOR_FILE)
    g, d = state.g.state_dict(), state.d.state_dict()
    class_keys = {k for k in g if k.endswith(("gain.weight", "bias.weight"))}
    assert len(class_keys) == 4  # two CBN layers at 28 px, gain and bias each
    for key in class_keys:
        assert torch.equal(g[key][0], base_g[key][1]), key
        assert torch.allclose(g[key][1], base_g[key].mean(dim=0)), key
    for key in g.keys() - class_keys:
        assert torch.equal(g[key], base_g[key]), key
    assert torch.equal(d[EMBED][0], base_d[EMBED][1])
    fresh = init_from_base(base_dir, ("new0", "new1"), CFG)[0].d.state_dict()[EMBED]  # same seed, same fresh D
    assert torch.equal(d[EMBED][1], fresh[1]) and not torch.allclose(d[EMBED][1], base_d[EMBED].mean(dim=0))
    for key in (k for k in d if not k.startswith("embed.")):
        assert torch.equal(d[key], base_d[key]), key
    for key, value in state.ema.state_dict().items():
        assert torch.equal(value, g[key]), key


def test_new_classes_start_apart_near_the_base_classes_their_images_resemble(base_dir: Path) -> None:
    # Two new classes whose images differ (dark vs bright): the base D scores them differently against its classes.
    images = torch.cat([torch.full((6, 1, 28, 28), 10, dtype=torch.uint8), torch.full((6, 1, 28, 28), 240)])
    data = LabelledImages(images.to(torch.uint8), torch.tensor([0] * 6 + [1] * 6), ("dark", "bright"))
    state, _, mapping = init_from_base(base_dir, ("dark", "bright"), CFG, data=data)
    assert mapping.new == ("dark", "bright") and set(mapping.nearest) == {"dark", "bright"}
    assert set(mapping.nearest.values()) <= set(BASE_CLASSES)
    base_g = _weights(base_dir / WEIGHTS_FILE)
    g = state.g.state_dict()
    for key in (k for k in g if k.endswith(("gain.weight", "bias.weight"))):
        assert not torch.allclose(g[key][0], g[key][1]), key  # not both the same mean row
        for row in g[key]:  # each row a convex blend of the base's rows: inside their per-feature range
            assert bool((row >= base_g[key].min(dim=0).values - 1e-6).all())
            assert bool((row <= base_g[key].max(dim=0).values + 1e-6).all())


def test_ema_ramp_up_keeps_a_short_runs_average_recent() -> None:
    from models.train import ema_decay_at

    fixed = TrainConfig(ema_decay=0.999, ema_start=10)
    assert ema_decay_at(10, fixed) == 0.0 and ema_decay_at(11, fixed) == 0.999
    ramped = TrainConfig(ema_decay=0.999, ema_start=0, ema_rampup=0.05)
    assert ema_decay_at(20, ramped) == pytest.approx(0.5)  # half-life 0.05 * 20 = 1 step
    assert ema_decay_at(1000, ramped) == pytest.approx(0.5 ** (1 / 50))
    assert ema_decay_at(10**6, ramped) == pytest.approx(0.999)  # capped by ema_decay's own half-life


def test_the_remapped_projection_is_normalised_by_its_true_spectral_norm(base_dir: Path) -> None:
    state, _, _ = init_from_base(base_dir, CLASSES, CFG)
    state.d.eval()  # no power iteration: the stored vectors alone give sigma
    with torch.no_grad():
        weight = state.d.embed.weight  # (K, F), divided by the estimated sigma
    assert float(torch.linalg.matrix_norm(weight, ord=2)) == pytest.approx(1.0, abs=1e-4)


def test_fine_tuning_a_few_steps_exports_a_servable_model(base_dir: Path, tmp_path: Path) -> None:
    tuner = FineTuner(*init_from_base(base_dir, CLASSES, CFG)[:2], _data(), CFG)
    stats = [tuner.step_once() for _ in range(CFG.steps)]
    assert tuner.done and [s.step for s in stats] == [1, 2, 3, 4] and stats[-1].total == 4
    assert all(torch.isfinite(torch.tensor([s.d_loss, s.g_loss])).all() for s in stats)
    assert stats[-1].augment_p == tuner.augment_p == 1.0 and stats[-1].steps_per_s > 0
    assert tuner.sample_grid([1, 2]).shape == (4, 1, 28, 28)
    tuner.export(tmp_path / "out")
    model = load_generator(tmp_path / "out")
    assert model.class_names == CLASSES
    assert model.sample([0, 1], [5, 5]).shape == (2, 1, 28, 28)
    assert (tmp_path / "out" / DISCRIMINATOR_FILE).is_file()


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(base_dir: Path, tmp_path: Path) -> None:
    augment = AugmentConfig(policy=("color", "translation", "cutout"), ada_target=0.6, ada_interval=1, ada_kimg=0.04)
    cfg = FineTuneConfig(steps=4, batch_size=8, augment=augment, bn_recalibration_batches=1)
    straight = FineTuner(*init_from_base(base_dir, CLASSES, cfg)[:2], _data(), cfg)
    straight_losses = [straight.step_once().d_loss for _ in range(4)]

    first = FineTuner(*init_from_base(base_dir, CLASSES, cfg)[:2], _data(), cfg)
    losses = [first.step_once().d_loss for _ in range(2)]
    first.save_checkpoint(tmp_path / "ckpt" / "checkpoint.safetensors")
    resumed = FineTuner.load_checkpoint(tmp_path / "ckpt" / "checkpoint.safetensors", _data(), cfg)
    assert resumed.step == 2 and resumed.ada.p == first.ada.p > 0
    losses += [resumed.step_once().d_loss for _ in range(2)]

    assert losses == straight_losses
    assert resumed.ada.state() == straight.ada.state()
    for net in ("g", "d", "ema"):
        for (key, a), b in zip(
            getattr(resumed.state, net).state_dict().items(),
            getattr(straight.state, net).state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b), (net, key)


def test_freeze_d_keeps_the_first_discriminator_block_and_trains_the_rest(base_dir: Path) -> None:
    cfg = FineTuneConfig(steps=3, batch_size=8, freeze_d=1)
    tuner = FineTuner(*init_from_base(base_dir, CLASSES, cfg)[:2], _data(), cfg)
    before = {k: v.clone() for k, v in tuner.state.d.named_parameters()}
    trained = {id(p) for group in tuner.state.opt_d.param_groups for p in group["params"]}
    for _ in range(3):
        tuner.step_once()
    for key, value in tuner.state.d.named_parameters():
        frozen = key.startswith("blocks.0.")
        assert torch.equal(value, before[key]) == frozen, key
        assert (id(value) in trained) != frozen, key


def test_freeze_d_needs_the_base_discriminator_and_at_most_all_blocks(base_dir: Path, tmp_path: Path) -> None:
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copy(base_dir / name, tmp_path / name)
    with pytest.raises(InvalidModelConfig, match=f"freeze_d=1 needs the base's discriminator.*{DISCRIMINATOR_FILE}"):
        init_from_base(tmp_path, CLASSES, FineTuneConfig(freeze_d=1))
    state, _, _ = init_from_base(tmp_path, CLASSES, FineTuneConfig(freeze_d=0))  # a fresh D is fine unfrozen
    assert state.d.embed.parametrizations.weight.original.shape[0] == 2
    with pytest.raises(InvalidModelConfig, match="freeze_d=3 but the discriminator has 2 blocks"):
        init_from_base(base_dir, CLASSES, FineTuneConfig(freeze_d=3))


def test_a_cvae_base_is_refused(tmp_path: Path) -> None:
    config = cvae.CVAEConfig(class_names=("a", "b"), z_dim=2, width=4, embed_dim=2)
    save_generator(tmp_path, config, cvae.Decoder(config))
    with pytest.raises(InvalidModelConfig, match=f"fine-tuning needs a cgan base; {tmp_path} is a cvae"):
        init_from_base(tmp_path, CLASSES, CFG)


@pytest.mark.parametrize(("side", "channels", "shown"), [(32, 1, "1x32x32"), (28, 3, "3x28x28")])
def test_data_of_another_resolution_or_channel_count_is_refused(
    base_dir: Path, side: int, channels: int, shown: str
) -> None:
    state, model_cfg, _ = init_from_base(base_dir, CLASSES, CFG)
    with pytest.raises(DatasetError, match=f"{shown} .* makes 1x28x28"):
        FineTuner(state, model_cfg, _data(side, channels), CFG)


def test_data_with_other_class_names_is_refused(base_dir: Path) -> None:
    state, model_cfg, _ = init_from_base(base_dir, CLASSES, CFG)
    with pytest.raises(DatasetError, match="differ from the model's"):
        FineTuner(state, model_cfg, _images(8, 2), CFG)


def test_fine_tune_config_json_round_trip() -> None:
    cfg = FineTuneConfig(steps=7, freeze_d=2, augment=AugmentConfig(policy=("color",), ada_target=0.6))
    assert FineTuneConfig.from_json(cfg.to_json()) == cfg
    assert FineTuneConfig().augment.policy == ("translation", "cutout")
