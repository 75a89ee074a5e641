"""The accelerated forward pass (bf16, channels_last, torch.compile per batch-size bucket), checked on the CPU:
close to the exact fp32 images, still per-image, and compiled once per bucket, not once per batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_model import make_tiny_model
from torch._dynamo import register_backend

from models import cgan
from models.data import FASHION_MNIST_CLASSES
from models.generator import Acceleration, batch_bucket, load_generator, save_generator

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
COMPILED: list[list[tuple[int, ...]]] = []  # input shapes of every graph the recording backend was given


@register_backend
def genq_test_recorder(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    """A torch.compile backend that records what it compiles and runs the captured graph as is."""
    COMPILED.append([tuple(t.shape) for t in example_inputs])
    return graph.forward


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("n", "bucket"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (64, 64), (65, 128)])
def test_batch_bucket_is_the_next_power_of_two(n: int, bucket: int) -> None:
    assert batch_bucket(n) == bucket


@pytest.mark.parametrize("model", ["fmnist-cgan/1", "fmnist-cvae/2"])
def test_bf16_and_channels_last_stay_within_grey_levels_of_fp32_and_per_image(model: str) -> None:
    labels, seeds = [i % 10 for i in range(32)], list(range(100, 132))
    exact = load_generator(ZOO / model).sample(labels, seeds)
    fast = load_generator(ZOO / model, accel=Acceleration(bf16=True, channels_last=True))
    images = fast.sample(labels, seeds)
    assert images.dtype == torch.uint8 and images.shape == exact.shape
    diff = (images.int() - exact.int()).abs()
    assert float(diff.float().mean()) < 1.0 and not torch.equal(images, exact)  # bf16 did run, and stayed close
    for i in (0, 13, 31):
        alone = fast.sample([labels[i]], [seeds[i]])[0]
        assert int((alone.int() - images[i].int()).abs().max()) <= 2


def test_channels_last_alone_keeps_images_within_one_grey_level() -> None:
    labels, seeds = list(range(10)), list(range(10))
    exact = load_generator(ZOO / "fmnist-cgan" / "1").sample(labels, seeds)
    nhwc = load_generator(ZOO / "fmnist-cgan" / "1", accel=Acceleration(channels_last=True)).sample(labels, seeds)
    assert int((nhwc.int() - exact.int()).abs().max()) <= 1


def test_compiled_sampling_pads_each_batch_to_its_bucket_and_compiles_once_per_bucket(tmp_path: Path) -> None:
    directory = make_tiny_model(tmp_path)
    exact = load_generator(directory)
    compiled = load_generator(directory, accel=Acceleration(compile_backend="genq_test_recorder"))
    COMPILED.clear()
    for n in (3, 4, 5, 1, 7):
        labels, seeds = [i % 10 for i in range(n)], list(range(n))
        images = compiled.sample(labels, seeds)
        assert images.shape[0] == n  # the padding is cut off again
        assert int((images.int() - exact.sample(labels, seeds).int()).abs().max()) <= 1
    # Each graph's latents are its one (batch, z_dim=8) input; the weights' shapes are (784, 8), (10, 8), ...
    batches = [[s[0] for s in shapes if len(s) == 2 and s[1] == 8 and s[0] in (1, 2, 4, 8)] for shapes in COMPILED]
    assert batches == [[4], [8], [1]]  # one graph per bucket: 3 and 4 share 4, 5 and 7 share 8


def test_every_bucket_of_every_compiled_model_gets_its_graph_past_dynamos_default_limit(tmp_path: Path) -> None:
    # Dynamo keeps 8 graphs per code object by default and all samplers share _decode's: two models of different
    # widths at 10 buckets each (batch 1 to 512) need 20 graphs; the 9th would otherwise run eager, with a warning.
    exact, compiled = [], []
    for width in (4, 6):
        config = cgan.CGANConfig(class_names=FASHION_MNIST_CLASSES, z_dim=8, g_ch=width, d_ch=4)
        torch.manual_seed(width)
        save_generator(tmp_path / str(width), config, cgan.Generator(config))
        exact.append(load_generator(tmp_path / str(width)))
        compiled.append(load_generator(tmp_path / str(width), accel=Acceleration(compile_backend="genq_test_recorder")))
    torch._dynamo.reset()  # graphs cached by the tests before (same code, same shapes) would be reused
    COMPILED.clear()
    for fast, slow in zip(compiled, exact, strict=True):
        for n in (1 << k for k in range(10)):
            labels, seeds = [i % 10 for i in range(n)], list(range(n))
            assert int((fast.sample(labels, seeds).int() - slow.sample(labels, seeds).int()).abs().max()) <= 1
    # A graph's latents: its one (batch, z_dim=8) input with a power-of-two batch (weights: (784, 8), (10, 8) ...)
    batches = [s[0] for shapes in COMPILED for s in shapes if len(s) == 2 and s[1] == 8 and s[0] & (s[0] - 1) == 0]
    assert batches == [1 << k for k in range(10)] * 2  # one graph per (model, bucket); without the raised limits, 8
