"""The cVAE: per-seed deterministic sampling, exact weight round trips, KL warm-up, training that learns and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import cgan, cvae
from models import train as cgan_train
from models.data import FASHION_MNIST_CLASSES, LabelledImages
from models.errors import DatasetError, InvalidModelConfig, WeightsError
from models.generator import CONFIG_FILE, WEIGHTS_FILE, CVAESampler, load_generator, save_generator
from models.train_cvae import CVAETrainConfig, load_checkpoint, train_cvae

ZOO = Path(cvae.__file__).parent / "zoo"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised decoder (a few kB) whose outputs spread over the whole grey range."""
    torch.manual_seed(0)
    config = cvae.CVAEConfig(class_names=FASHION_MNIST_CLASSES, z_dim=8, width=4, embed_dim=4)
    decoder = cvae.Decoder(config)
    with torch.no_grad():
        decoder.out.weight.mul_(20.0)  # saturate some pixels, leave others mid-grey: rounding gets exercised
        decoder.embed.weight.normal_(0.0, 2.0)  # labels must change the image
    directory = tmp_path_factory.mktemp("zoo") / "tiny-cvae" / "1"
    save_generator(directory, config, decoder)
    return directory


def test_one_image_alone_equals_the_same_image_inside_a_batch_of_64(tiny_dir: Path) -> None:
    model = load_generator(tiny_dir)
    labels = [i % 10 for i in range(64)]
    seeds = [1000 + i for i in range(64)]
    batch = model.sample(labels, seeds)  # (64, 1, 28, 28)
    assert batch.dtype == torch.uint8 and batch.shape == (64, 1, 28, 28)
    assert int(batch.max()) - int(batch.min()) > 100  # a real spread of grey levels, not a constant image
    alone = torch.cat([model.sample([label], [seed]) for label, seed in zip(labels, seeds, strict=True)])
    assert torch.equal(alone, batch)  # byte for byte, every image


def test_sampling_is_repeatable_and_depends_on_seed_and_label(tiny_dir: Path) -> None:
    model = load_generator(tiny_dir)
    a, b = model.sample([7, 7, 0], [1, 2, 1]), model.sample([7, 7, 0], [1, 2, 1])
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # seed
    assert not torch.equal(a[0], a[2])  # label


@pytest.mark.parametrize("version", ["1", "2"])
def test_the_shipped_fmnist_cvae_versions_serve_every_class(version: str) -> None:
    model = load_generator(ZOO / "fmnist-cvae" / version)
    assert isinstance(model, CVAESampler) and model.class_names == FASHION_MNIST_CLASSES
    assert json.loads((ZOO / "fmnist-cvae" / "aliases.json").read_text()) == {"latest": "2"}
    images = model.sample(list(range(10)), [42] * 10)
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.uint8
    assert all(int(image.max()) > 128 for image in images)  # a bright garment on every row, not a blank


def test_fmnist_cvae_2_samples_its_fitted_class_gaussian_prior() -> None:
    model = load_generator(ZOO / "fmnist-cvae" / "2")
    assert isinstance(model, CVAESampler) and model.config.prior == "class-gaussian"
    eps = cgan.latents_for_seeds([42], model.config.z_dim)
    z = model.net.latents(torch.tensor([4]), eps)
    assert not torch.allclose(z, eps)  # coats draw from their own fitted Gaussian, not from N(0, I)


def test_sample_refuses_out_of_range_labels_and_mismatched_lengths(tiny_dir: Path) -> None:
    model = load_generator(tiny_dir)
    with pytest.raises(ValueError, match="out of range"):
        model.sample([10], [1])
    with pytest.raises(ValueError, match="2 labels but 1 seeds"):
        model.sample([1, 2], [1])


def test_weights_round_trip_through_safetensors_exactly_and_load_generator_serves_a_cvae(tmp_path: Path) -> None:
    config = cvae.CVAEConfig(class_names=("a", "b", "c"), resolution=32, channels=3, z_dim=4, width=4)
    decoder = cvae.Decoder(config)
    save_generator(tmp_path, config, decoder)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["arch"] == "cvae"
    loaded = load_generator(tmp_path)
    assert isinstance(loaded, CVAESampler)
    assert loaded.resolution == 32 and loaded.channels == 3 and loaded.class_names == ("a", "b", "c")
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    assert stored.keys() == decoder.state_dict().keys()
    for key, value in decoder.state_dict().items():
        assert torch.equal(stored[key], value), key
        assert torch.equal(loaded.net.state_dict()[key], value), key
    assert loaded.sample([2], [3]).shape == (1, 3, 32, 32)


def test_mismatched_weights_and_unknown_architectures_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / CONFIG_FILE).read_text())
    (tmp_path / WEIGHTS_FILE).write_bytes((tiny_dir / WEIGHTS_FILE).read_bytes())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "width": 8}))
    with pytest.raises(WeightsError):
        load_generator(tmp_path)  # shapes do not match the config
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "arch": "diffusion"}))
    with pytest.raises(InvalidModelConfig, match="known: cgan, cvae"):
        load_generator(tmp_path)


@pytest.mark.parametrize("resolution", [28, 32, 64])
def test_every_resolution_builds_matching_encoder_and_decoder(resolution: int) -> None:
    config = cvae.CVAEConfig(class_names=("a", "b"), resolution=resolution, channels=3, z_dim=4, width=4)
    x, y = torch.rand(2, 3, resolution, resolution), torch.tensor([0, 1])
    mu, logvar = cvae.Encoder(config)(x, y)
    assert mu.shape == logvar.shape == (2, 4)
    images = cvae.Decoder(config)(mu, y)
    assert images.shape == (2, 3, resolution, resolution)
    assert images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.parametrize(
    ("step", "beta", "warmup", "expected"),
    [(0, 1.0, 100, 0.0), (25, 1.0, 100, 0.25), (50, 2.0, 100, 1.0), (100, 1.0, 100, 1.0), (500, 0.5, 100, 0.5)]
    + [(0, 1.0, 0, 1.0), (7, 0.3, 0, 0.3)],
)
def test_kl_weight_warms_up_linearly_then_holds_at_beta(step: int, beta: float, warmup: int, expected: float) -> None:
    assert cvae.kl_weight(step, beta, warmup) == pytest.approx(expected)


def test_kl_is_zero_exactly_at_the_prior_and_positive_elsewhere() -> None:
    zeros = torch.zeros(3, 5)
    assert torch.equal(cvae.kl_divergence(zeros, zeros), torch.zeros(3))
    assert (cvae.kl_divergence(torch.ones(3, 5), zeros) > 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolution": 48},
        {"channels": 2},
        {"class_names": ()},
        {"class_names": ("a", "a")},
        {"z_dim": 0},
        {"width": 0},
        {"embed_dim": -1},
        {"arch": "cgan"},
        {"prior": "gmm"},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"class_names": ("a", "b"), **kwargs}
    with pytest.raises(InvalidModelConfig):
        cvae.CVAEConfig(**fields)  # type: ignore[arg-type]


def test_config_round_trips_through_json() -> None:
    config = cvae.CVAEConfig(class_names=("a", "b"), resolution=64, channels=3, z_dim=3, width=5, embed_dim=2)
    assert cvae.CVAEConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def _synthetic_data(n: int = 256) -> LabelledImages:
    """Two easy classes: a bright square on the left or on the right."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    images[labels == 0, :, 6:22, 2:12] = 255
    images[labels == 1, :, 6:22, 16:26] = 255
    return LabelledImages(images, labels, ("left", "right"))


def _tiny_config(data: LabelledImages) -> cvae.CVAEConfig:
    return cvae.CVAEConfig(class_names=data.class_names, z_dim=4, width=4, embed_dim=4)


def test_short_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path: Path) -> None:
    data = _synthetic_data()
    losses: list[float] = []
    cfg = CVAETrainConfig(steps=30, batch_size=16, lr=3e-3, kl_warmup_steps=10, sample_every=15, checkpoint_every=15)
    train_cvae(data, tmp_path, cfg, _tiny_config(data), on_step=lambda s: losses.append(s.g_loss))
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    model = load_generator(tmp_path / "export")
    assert model.sample([0, 1], [1, 1]).shape == (2, 1, 28, 28)
    assert (tmp_path / "samples" / "step-000030.png").is_file()
    assert (tmp_path / "export" / "samples.png").is_file()


def test_resume_continues_exactly_where_training_stopped(tmp_path: Path) -> None:
    data = _synthetic_data(128)
    config = _tiny_config(data)
    half = CVAETrainConfig(steps=4, batch_size=16, kl_warmup_steps=6, sample_every=100, checkpoint_every=2)
    full = CVAETrainConfig(steps=8, batch_size=16, kl_warmup_steps=6, sample_every=100, checkpoint_every=2)
    logs: list[str] = []
    train_cvae(data, tmp_path / "a", half, config)
    resumed = train_cvae(data, tmp_path / "a", full, config, on_log=logs.append)
    straight = train_cvae(data, tmp_path / "b", full, config)
    assert logs == ["resuming from step 4: 4 of 8 steps remaining"]
    for net in ("encoder", "decoder"):
        a_sd, b_sd = getattr(resumed, net).state_dict(), getattr(straight, net).state_dict()
        for key, value in a_sd.items():
            assert torch.equal(value, b_sd[key]), f"{net}.{key}"
    assert torch.equal(resumed.rng.get_state(), straight.rng.get_state())
    state, loaded_config = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors", full)
    assert state.step == 8 and loaded_config == config
    for key, value in state.decoder.state_dict().items():
        assert torch.equal(value, straight.decoder.state_dict()[key]), key


def test_a_cgan_checkpoint_is_not_resumed_as_a_cvae(tmp_path: Path) -> None:
    data = _synthetic_data(64)
    gan_cfg = cgan.CGANConfig(class_names=data.class_names, z_dim=4, g_ch=4, d_ch=4)
    train_cfg = cgan_train.TrainConfig()
    state = cgan_train.new_state(gan_cfg, train_cfg)
    cgan_train.save_checkpoint(tmp_path / "checkpoint.safetensors", state, gan_cfg, train_cfg)
    with pytest.raises(WeightsError, match="not a cvae checkpoint"):
        train_cvae(data, tmp_path, CVAETrainConfig(steps=1, batch_size=8))


def test_images_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    data = _synthetic_data(64)
    config = cvae.CVAEConfig(class_names=data.class_names, resolution=32, z_dim=4, width=4)
    with pytest.raises(DatasetError, match="images are"):
        train_cvae(data, tmp_path, CVAETrainConfig(steps=1, batch_size=8), config)
    with pytest.raises(DatasetError, match="fewer than one batch"):
        train_cvae(data, tmp_path, CVAETrainConfig(steps=1, batch_size=65))


def _gaussian_decoder(seed: int = 0) -> cvae.Decoder:
    torch.manual_seed(seed)
    config = cvae.CVAEConfig(class_names=FASHION_MNIST_CLASSES, z_dim=8, width=4, embed_dim=4, prior="class-gaussian")
    decoder = cvae.Decoder(config)
    with torch.no_grad():
        decoder.out.weight.mul_(20.0)
        decoder.prior_mean.normal_(0.0, 2.0)
        decoder.prior_scale_tril.copy_(torch.tril(torch.randn(10, 8, 8)) * 0.5 + torch.eye(8))
    return decoder


def test_an_unfitted_class_gaussian_prior_is_the_standard_prior() -> None:
    torch.manual_seed(0)
    fitted = cvae.Decoder(cvae.CVAEConfig(class_names=("a", "b"), z_dim=4, width=4, prior="class-gaussian"))
    standard = cvae.Decoder(cvae.CVAEConfig(class_names=("a", "b"), z_dim=4, width=4))
    standard.load_state_dict({k: v for k, v in fitted.state_dict().items() if not k.startswith("prior_")})
    labels, seeds = [0, 1, 1], [5, 6, 7]
    assert torch.equal(cvae.sample_images(fitted, labels, seeds), cvae.sample_images(standard, labels, seeds))


def test_a_class_gaussian_prior_draws_per_class_and_per_image_whatever_the_batch(tmp_path: Path) -> None:
    save_generator(tmp_path, _gaussian_decoder().cfg, _gaussian_decoder())
    model = load_generator(tmp_path)  # the prior's buffers travel in weights.safetensors, loaded strictly
    labels, seeds = [i % 10 for i in range(64)], [300 + i for i in range(64)]
    batch = model.sample(labels, seeds)
    for i in (0, 31, 63):
        assert (model.sample([labels[i]], [seeds[i]])[0].int() - batch[i].int()).abs().max() <= 1
    eps = cgan.latents_for_seeds([7], 8)
    decoder = _gaussian_decoder()
    z = decoder.latents(torch.tensor([3]), eps)
    expected = decoder.prior_mean[3] + decoder.prior_scale_tril[3] @ eps[0]
    assert torch.allclose(z[0], expected, atol=1e-6)
    assert not torch.allclose(decoder.latents(torch.tensor([4]), eps), z)  # the class picks its own Gaussian


def test_fit_class_prior_matches_the_moments_of_each_class_aggregate_posterior() -> None:
    data = _synthetic_data(200)
    config = cvae.CVAEConfig(class_names=data.class_names, z_dim=4, width=4, embed_dim=4, prior="class-gaussian")
    torch.manual_seed(1)
    encoder, decoder = cvae.Encoder(config), cvae.Decoder(config)
    images = data.images.float() / 255.0
    images = images + 0.1 * torch.rand(images.shape)  # distinct posteriors within a class
    cvae.fit_class_prior(encoder, decoder, images, data.labels, batch_size=64)
    with torch.no_grad():
        mu, logvar = encoder(images, data.labels)
    for c in (0, 1):
        mask = data.labels == c
        cov = torch.cov(mu[mask].T) + torch.diag(logvar[mask].exp().mean(0))
        tril = decoder.prior_scale_tril[c]
        assert torch.allclose(decoder.prior_mean[c], mu[mask].mean(0), atol=1e-5)
        assert torch.allclose(tril @ tril.T, cov, atol=1e-4)
        assert torch.equal(tril, torch.tril(tril))


def test_fit_class_prior_refuses_a_standard_decoder_and_an_empty_class() -> None:
    data = _synthetic_data(16)
    images = data.images.float() / 255.0
    standard = cvae.CVAEConfig(class_names=data.class_names, z_dim=4, width=4)
    with pytest.raises(InvalidModelConfig, match="fitting needs 'class-gaussian'"):
        cvae.fit_class_prior(cvae.Encoder(standard), cvae.Decoder(standard), images, data.labels)
    three = cvae.CVAEConfig(class_names=("left", "right", "up"), z_dim=4, width=4, prior="class-gaussian")
    with pytest.raises(InvalidModelConfig, match="class 'up' has 0 images"):
        cvae.fit_class_prior(cvae.Encoder(three), cvae.Decoder(three), images, data.labels)


def test_training_with_a_class_gaussian_prior_exports_the_fitted_prior(tmp_path: Path) -> None:
    data = _synthetic_data(128)
    config = cvae.CVAEConfig(class_names=data.class_names, z_dim=4, width=4, embed_dim=4, prior="class-gaussian")
    cfg = CVAETrainConfig(steps=20, batch_size=16, lr=3e-3, kl_warmup_steps=5, sample_every=100, checkpoint_every=20)
    train_cvae(data, tmp_path, cfg, config)
    weights = load_file(tmp_path / "export" / WEIGHTS_FILE)
    assert not torch.equal(weights["prior_mean"], torch.zeros(2, 4))  # fitted, not the N(0, I) it started as
    assert json.loads((tmp_path / "export" / CONFIG_FILE).read_text())["prior"] == "class-gaussian"
    assert load_generator(tmp_path / "export").sample([0, 1], [3, 3]).shape == (2, 1, 28, 28)
