"""models.soup: two cGANs of one configuration averaged into a servable folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from models import cgan
from models.errors import InvalidModelConfig, WeightsError
from models.generator import WEIGHTS_FILE, load_generator, save_generator
from models.soup import average_state, main, soup
from models.train import DISCRIMINATOR_FILE

CONFIG = cgan.CGANConfig(class_names=("a", "b", "c"), z_dim=8, g_ch=4, d_ch=4)


def _model(directory: Path, seed: int, config: cgan.CGANConfig = CONFIG, with_d: bool = True) -> Path:
    torch.manual_seed(seed)
    save_generator(directory, config, cgan.Generator(config))
    if with_d:
        save_model(cgan.Discriminator(config), str(directory / DISCRIMINATOR_FILE), metadata={"arch": config.arch})
    return directory


def _learned(directory: Path, file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """A folder's tensors but BN's statistics, which the soup recomputes."""
    tensors = load_file(str(directory / file))
    return {k: v for k, v in tensors.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_the_soup_is_the_weighted_mean_of_both_nets_and_serves(tmp_path: Path) -> None:
    a, b = _model(tmp_path / "a", 1), _model(tmp_path / "b", 2)
    soup(a, b, 0.25, tmp_path / "ab", bn_batches=2)
    for file in (WEIGHTS_FILE, DISCRIMINATOR_FILE):
        left, right, mixed = _learned(a, file), _learned(b, file), _learned(tmp_path / "ab", file)
        assert mixed.keys() == left.keys()
        for name, value in mixed.items():
            assert torch.allclose(value, 0.25 * left[name] + 0.75 * right[name]), name
    stats = load_file(str(tmp_path / "ab" / WEIGHTS_FILE))["out_bn.running_mean"]
    assert not torch.equal(stats, load_file(str(a / WEIGHTS_FILE))["out_bn.running_mean"])  # recalibrated
    assert load_generator(tmp_path / "ab").sample([0, 2], [5, 6]).shape == (2, 1, 28, 28)
    assert (tmp_path / "ab" / "samples.png").stat().st_size > 0


def test_a_weight_of_one_gives_back_the_first_net(tmp_path: Path) -> None:
    a, b = _model(tmp_path / "a", 1), _model(tmp_path / "b", 2, with_d=False)
    soup(a, b, 1.0, tmp_path / "out", bn_batches=2)
    assert all(torch.equal(v, _learned(a)[k]) for k, v in _learned(tmp_path / "out").items())
    assert not (tmp_path / "out" / DISCRIMINATOR_FILE).exists()  # only one of them had a D


@pytest.mark.parametrize(
    ("other", "words"),
    [
        (cgan.CGANConfig(class_names=("a", "b", "c"), z_dim=8, g_ch=8, d_ch=4), "differ in g_ch"),
        (cgan.CGANConfig(class_names=("a", "b", "x"), z_dim=8, g_ch=4, d_ch=4), "differ in class_names"),
    ],
)
def test_models_of_another_configuration_are_refused(tmp_path: Path, other: cgan.CGANConfig, words: str) -> None:
    a, b = _model(tmp_path / "a", 1), _model(tmp_path / "b", 2, config=other)
    with pytest.raises(InvalidModelConfig, match=words):
        soup(a, b, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_weights_and_missing_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _model(tmp_path / "a", 1), _model(tmp_path / "b", 2)
    with pytest.raises(InvalidModelConfig, match="between 0 and 1"):
        soup(a, b, 1.5, tmp_path / "out")
    (b / WEIGHTS_FILE).unlink()
    with pytest.raises(SystemExit) as stopped:
        main([str(a), str(b), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and f"no {WEIGHTS_FILE} in {b}" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="different tensors"):
        average_state({"x": torch.zeros(1)}, {"y": torch.zeros(1)}, 0.5)
