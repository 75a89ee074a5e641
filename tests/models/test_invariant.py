"""Batch invariance: an image's bytes do not depend on the batch it is sampled in (models.invariant)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.generator import Acceleration, load_generator
from models.invariant import BatchInvariantConv2d, BatchInvariantLinear

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "model", ["fmnist-cgan/1", "fmnist-cgan/3", "fmnist-cgan/4", "fmnist-cgan/5", "fmnist-cvae/1", "fmnist-cvae/2"]
)
def test_shipped_models_give_each_image_byte_identical_alone_and_in_any_batch(
    model: str, threads: int, channels_last: bool
) -> None:
    # Before BatchInvariantLinear and the lone image's dummy, 2 of these 256 cGAN images were a grey level off their
    # 1-image twins, and the cVAE's output convolution differed between a batch of 1 and larger ones.
    torch.set_num_threads(threads)  # the one_thread fixture restores it
    generator = load_generator(ZOO / model, accel=Acceleration(channels_last=channels_last))
    labels, seeds = [i % 10 for i in range(256)], list(range(1000, 1256))
    whole = generator.sample(labels, seeds)  # (256, 1, 28, 28)
    for chunk in (1, 7, 64):
        parts = [generator.sample(labels[i : i + chunk], seeds[i : i + chunk]) for i in range(0, 256, chunk)]
        assert torch.equal(torch.cat(parts), whole), f"chunks of {chunk}"


def test_rows_are_bit_identical_whatever_the_batch_and_close_to_the_batched_product() -> None:
    torch.manual_seed(0)
    layer = BatchInvariantLinear(100, 6272).eval()
    x = torch.randn(300, 100)
    with torch.no_grad():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(300)])
        for start, n in ((0, 300), (1, 3), (5, 64), (17, 255)):
            assert torch.equal(layer(x[start : start + n]), alone[start : start + n])
        plain_alone = torch.cat([F.linear(x[i : i + 1], layer.weight, layer.bias) for i in range(300)])
        batched = F.linear(x, layer.weight, layer.bias)
        assert not torch.equal(plain_alone, batched)  # the plain product's 1-row kernel differs: what this is for
        torch.testing.assert_close(alone, batched)
        assert layer(x[:0]).shape == (0, 6272)


def test_training_takes_the_batched_product_and_keeps_nn_linears_state_dict() -> None:
    layer = BatchInvariantLinear(8, 16)
    assert list(layer.state_dict()) == list(torch.nn.Linear(8, 16).state_dict()) == ["weight", "bias"]
    x = torch.randn(32, 8, requires_grad=True)
    out = layer(x)  # training mode, gradients on
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("shape", [(256, 256, 8), (16, 1, 28), (3, 32, 64)])  # (C_in, C_out, side)
def test_a_convolution_of_one_image_equals_the_same_image_in_a_batch(shape: tuple[int, int, int]) -> None:
    c_in, c_out, side = shape
    torch.manual_seed(0)
    conv = BatchInvariantConv2d(c_in, c_out, 3, padding=1).eval()
    x = torch.randn(16, c_in, side, side)
    with torch.no_grad():
        whole = conv(x)  # (16, C_out, side, side)
        assert torch.equal(torch.cat([conv(x[i : i + 1]) for i in range(16)]), whole)
        torch.testing.assert_close(whole, F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert list(conv.state_dict()) == ["weight", "bias"]
