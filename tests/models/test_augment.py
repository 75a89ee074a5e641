"""DiffAugment ops and the ADA probability: differentiable, reproducible from one generator, identity at p = 0."""

from __future__ import annotations

import pytest
import torch

from models.augment import POLICIES, AdaController, AugmentConfig, cutout, diff_augment, translate
from models.errors import InvalidModelConfig

ALL = ("color", "translation", "cutout")


def _batch(channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(8, channels, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (8, C, 16, 16)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", [(name,) for name in POLICIES] + [ALL])
def test_augmentation_keeps_shape_and_dtype_and_changes_the_batch(policy: tuple[str, ...], channels: int) -> None:
    x = _batch(channels)
    out = diff_augment(x, policy, 1.0, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


def test_p_zero_is_the_identity_and_draws_as_many_numbers_as_p_one() -> None:
    x = _batch()
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(diff_augment(x, ALL, 0.0, g0), x)
    diff_augment(x, ALL, 1.0, g1)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_translation_moves_a_single_pixel_and_fills_with_zero() -> None:
    x = torch.zeros(2, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0
    out = translate(x, torch.tensor([[2, -1], [-5, 0]]))
    assert out[0, 0, 5, 3] == 1.0 and out[0].sum() == 1.0
    assert out[1].sum() == 0.0  # shifted out of the image; nothing wraps around

    full = torch.ones(1, 1, 8, 8)
    shifted = translate(full, torch.tensor([[1, 2]]))
    assert shifted[0, 0, 0].sum() == 0 and shifted[0, 0, :, :2].sum() == 0 and shifted[0, 0, 1:, 2:].min() == 1


def test_cutout_zeroes_a_square_clipped_at_the_border() -> None:
    x = torch.full((2, 3, 8, 8), -1.0)
    out = cutout(x, torch.tensor([[2, 2], [-2, 6]]), size=4)
    assert (out[0, :, 2:6, 2:6] == 0).all() and (out[0] == 0).sum() == 3 * 16
    assert (out[1, :, 0:2, 6:8] == 0).all() and (out[1] == 0).sum() == 3 * 4


def test_random_cutout_sets_pixels_to_zero_not_black() -> None:
    x = torch.full((8, 1, 16, 16), -1.0)
    out = diff_augment(x, ("cutout",), 1.0, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {-1.0, 0.0}


def test_gradients_flow_through_every_op() -> None:
    x = _batch().requires_grad_(True)
    diff_augment(x, ALL, 1.0, torch.Generator().manual_seed(0)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_same_seed_same_output_and_no_global_rng() -> None:
    x = _batch()
    torch.manual_seed(0)
    a = diff_augment(x, ALL, 0.5, torch.Generator().manual_seed(7))
    global_state = torch.get_rng_state()
    b = diff_augment(x, ALL, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert not torch.equal(a, diff_augment(x, ALL, 0.5, torch.Generator().manual_seed(8)))


def test_half_probability_leaves_some_samples_untouched() -> None:
    x = _batch()
    out = diff_augment(x, ("translation",), 0.5, torch.Generator().manual_seed(0))
    untouched = [torch.equal(out[i], x[i]) for i in range(x.shape[0])]
    assert any(untouched) and not all(untouched)


def test_unknown_policy_names_are_refused_by_name() -> None:
    with pytest.raises(InvalidModelConfig, match="'flip'"):
        AugmentConfig(policy=("translation", "flip"))
    with pytest.raises(ValueError, match="'rotate'.*known: color, translation, cutout"):
        diff_augment(_batch(), ("rotate",), 1.0, torch.Generator())


@pytest.mark.parametrize(
    "kwargs",
    [{"policy": ("cutout", "cutout")}, {"ada_target": 0.6}, {"policy": ("color",), "ada_target": 1.5}],
)
def test_bad_augment_configs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidModelConfig):
        AugmentConfig(**kwargs)  # type: ignore[arg-type]


def test_augment_config_json_round_trip() -> None:
    cfg = AugmentConfig(policy=("color", "cutout"), ada_target=0.6, ada_interval=2, ada_kimg=0.5)
    assert AugmentConfig.from_json(cfg.to_json()) == cfg


def test_without_a_target_p_stays_one() -> None:
    ada = AdaController(AugmentConfig(policy=("cutout",)))
    for _ in range(10):
        ada.update(1.0, 32)
    assert ada.p == 1.0


def test_ada_raises_p_when_d_overfits_and_lowers_it_when_not() -> None:
    # kimg 0.512: a step of 32 images * 4 steps moves p by 0.25 at each adjustment
    ada = AdaController(AugmentConfig(policy=("cutout",), ada_target=0.6, ada_interval=4, ada_kimg=0.512))
    assert ada.p == 0.0
    for _ in range(3):
        ada.update(0.9, 32)
    assert ada.p == 0.0  # only every 4 steps
    assert ada.update(0.9, 32) == pytest.approx(0.25)
    for _ in range(8):
        ada.update(1.0, 32)
    assert ada.p == pytest.approx(0.75)
    for _ in range(4):
        ada.update(0.2, 32)
    assert ada.p == pytest.approx(0.5)
    for _ in range(40):
        ada.update(-1.0, 32)
    assert ada.p == 0.0  # clamped


def test_ada_state_round_trip_mid_interval() -> None:
    cfg = AugmentConfig(policy=("cutout",), ada_target=0.6, ada_interval=4, ada_kimg=0.512)
    a, b = AdaController(cfg), AdaController(cfg)
    for _ in range(6):
        a.update(0.9, 32)
    b.load_state(a.state())
    assert all(isinstance(v, float) for v in a.state().values())
    for _ in range(2):
        assert a.update(0.9, 32) == b.update(0.9, 32)
    assert a.p == pytest.approx(0.5)
