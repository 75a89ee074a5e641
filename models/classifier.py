"""A small in-domain CNN classifier: the fixed feature extractor of the offline metrics, and the CAS model.

Inception-v3 features need a download and were never trained on 28x28 greyscale garments; an in-domain classifier
is what the small-GAN literature uses offline (PyTorch-StudioGAN, Ravuri & Vinyals 2019). Its penultimate layer
(``features``, 128-d) feeds FID/KID/precision-recall, its logits feed label consistency, and the same architecture
trained on generated images gives the Classification Accuracy Score.

Weights are ``classifier.safetensors``; ``classifier.json`` holds the architecture, class names, the real test
accuracy and how the weights were trained. Never ``config.json``: the worker's registry would take the folder for
a generator.

Reproduce the shipped extractor with::

    python -m models.classifier --out models/zoo/_metrics/fmnist-classifier --epochs 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn

from models.config import JsonConfig
from models.data import LabelledImages
from models.errors import DatasetError, InvalidModelConfig, WeightsError
from models.generator import load_weights

ARCH = "cnn-classifier"
WEIGHTS_FILE = "classifier.safetensors"
CARD_FILE = "classifier.json"
SHIPPED_DIR = Path(__file__).parent / "zoo" / "_metrics" / "fmnist-classifier"


@dataclass(frozen=True)
class ClassifierConfig(JsonConfig):
    """Everything needed to rebuild the network; stored in ``classifier.json`` beside the weights."""

    class_names: tuple[str, ...]
    resolution: int = 28
    channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64)  # one conv block (conv-BN-ReLU-maxpool) per width
    pool: int = 3  # side of the map flattened into the head: 28 -> 14 -> 7 -> 3 with the default widths
    feature_dim: int = 128  # size of the penultimate embedding the metrics use
    dropout: float = 0.3
    arch: str = field(default=ARCH)

    def __post_init__(self) -> None:
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise InvalidModelConfig(f"a classifier needs two or more unique class names, got {list(self.class_names)}")
        if self.channels < 1:
            raise InvalidModelConfig(f"channels must be at least 1, got {self.channels}")
        if not self.widths or self.resolution < 2 ** len(self.widths):
            raise InvalidModelConfig(f"resolution {self.resolution} is too small for {len(self.widths)} 2x poolings")
        if self.feature_dim < 1 or not 0.0 <= self.dropout < 1.0:
            raise InvalidModelConfig(f"bad feature_dim {self.feature_dim} or dropout {self.dropout}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ConvBlock(nn.Module):
    """3x3 conv, BN, ReLU, 2x2 max-pool: (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)


class Classifier(nn.Module):
    """images (B, C, R, R) as floats in [-1, 1] -> logits (B, num_classes); ``features`` gives (B, feature_dim)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels, *cfg.widths]
        self.blocks = nn.Sequential(*(ConvBlock(widths[i], widths[i + 1]) for i in range(len(cfg.widths))))
        self.pool = nn.AdaptiveAvgPool2d(cfg.pool)  # the identity at 28 px; any resolution ends at pool x pool
        self.fc = nn.Linear(widths[-1] * cfg.pool * cfg.pool, cfg.feature_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding: images (B, C, R, R) in [-1, 1] -> (B, feature_dim), non-negative (post-ReLU)."""
        h = self.pool(self.blocks(x))  # (B, C_last, pool, pool)
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))  # (B, num_classes)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W) in [0, 255] -> float32 (B, C, H, W) in [-1, 1], the generators' range."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def embed(model: Classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 features (N, feature_dim), in eval mode, batch by batch."""
    model.eval()
    chunks = [model.features(to_input(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.cfg.feature_dim)


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> predicted class indices (N,) int64, in eval mode."""
    model.eval()
    chunks = [model(to_input(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)


def accuracy(model: Classifier, data: LabelledImages) -> float:
    """Fraction of ``data`` (uint8 images, int64 labels) whose predicted class equals its label."""
    if len(data) == 0:
        raise DatasetError("cannot measure accuracy on an empty data set")
    return float((predict(model, data.images) == data.labels).float().mean())


def augment_batch(x: torch.Tensor, rng: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (pad, then crop at a random offset) and random horizontal flips.

    x: float images (B, C, H, W) in [-1, 1]; returns the same shape. Pads with -1 (black, the Fashion-MNIST
    background): zero would be mid-grey.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=rng)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=rng)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        flipped = torch.rand(b, generator=rng) < 0.5
        out = torch.where(flipped[:, None, None, None], out.flip(3), out)
    return out.contiguous()


@dataclass(frozen=True)
class ClassifierStep:
    """What a progress display needs after each optimisation step."""

    step: int
    total: int
    epoch: int
    loss: float


def train_classifier(
    data: LabelledImages,
    *,
    epochs: int = 6,
    batch_size: int = 128,
    seed: int = 0,
    augment: bool = False,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    config: ClassifierConfig | None = None,
    on_progress: Callable[[ClassifierStep], None] | None = None,
) -> Classifier:
    """Train a :class:`Classifier` on ``data`` (uint8 (N, C, R, R), int64 labels); returned in eval mode.

    AdamW with a per-step cosine decay to zero. Deterministic given ``seed`` on a given machine and thread count:
    initialisation and dropout draw from a forked global RNG, shuffling and augmentation from their own generator.
    The caller's global RNG state is left untouched.

    Raises:
        DatasetError: ``data`` is empty or its class list does not match ``config``.
    """
    if len(data) == 0:
        raise DatasetError("cannot train a classifier on an empty data set")
    _, channels, resolution, _ = data.images.shape
    cfg = config or ClassifierConfig(class_names=data.class_names, resolution=resolution, channels=channels)
    if cfg.class_names != data.class_names:
        raise DatasetError(f"config classes {list(cfg.class_names)} differ from the data's {list(data.class_names)}")
    steps_per_epoch = -(-len(data) // batch_size)
    total = max(1, epochs * steps_per_epoch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(cfg)
        rng = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
        model.train()
        step = 0
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=rng)
            for i in range(0, len(data), batch_size):
                idx = order[i : i + batch_size]
                x = to_input(data.images[idx])  # (B, C, R, R)
                if augment:
                    x = augment_batch(x, rng)
                loss = F.cross_entropy(model(x), data.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                step += 1
                if on_progress is not None:
                    on_progress(ClassifierStep(step, total, epoch + 1, float(loss.detach())))
    return model.eval()


@dataclass(frozen=True)
class ClassifierCard:
    """What ``classifier.json`` records: the architecture, its real test accuracy and how it was trained."""

    name: str
    config: ClassifierConfig
    test_accuracy: float | None = None  # on the data set's real test split, measured after training
    test_split: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # command, seconds, epochs, seed, ...

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.config.arch,
            "config": self.config.to_json(),
            "test_accuracy": self.test_accuracy,
            "test_split": self.test_split,
            "training": self.training,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassifierCard:
        return cls(
            name=str(data.get("name", "")),
            config=ClassifierConfig.from_json(data["config"]),
            test_accuracy=data.get("test_accuracy"),
            test_split=str(data.get("test_split", "")),
            training=dict(data.get("training", {})),
        )


def save_classifier(directory: Path, model: Classifier, card: ClassifierCard) -> None:
    """Write ``classifier.safetensors`` and ``classifier.json`` into ``directory``."""
    if card.config != model.cfg:
        raise InvalidModelConfig("the card's config does not describe the model being saved")
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"arch": ARCH})
    (directory / CARD_FILE).write_text(json.dumps(card.to_json(), indent=2) + "\n")


def load_classifier(directory: Path = SHIPPED_DIR) -> tuple[Classifier, ClassifierCard]:
    """Load a classifier saved by :func:`save_classifier`, strictly and without unpickling; eval mode.

    Raises:
        WeightsError: a file is missing, not valid JSON, or the tensors do not match the config.
        InvalidModelConfig: the card names another architecture or bad dimensions.
    """
    path = directory / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"no {CARD_FILE} in {directory}") from exc
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "config" not in data:
        raise WeightsError(f"{path} has no 'config' field")
    if data.get("arch") != ARCH:
        raise InvalidModelConfig(f"unknown classifier architecture {data.get('arch')!r} in {path} (known: {ARCH})")
    card = ClassifierCard.from_json(data)
    model = Classifier(card.config)
    load_weights(model, directory / WEIGHTS_FILE)
    return model.eval(), card


def main(argv: Sequence[str] | None = None) -> None:
    """Train the Fashion-MNIST feature extractor, measure its real test accuracy and save it (a rich progress bar)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from models.data import load_fashion_mnist

    parser = argparse.ArgumentParser(prog="python -m models.classifier", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for classifier.safetensors + .json")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False, help="shift and flip")
    parser.add_argument("--name", default="fmnist-classifier")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    train_data, test_data = load_fashion_mnist("train"), load_fashion_mnist("test")
    columns = (
        TextColumn("[bold]classifier[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss={task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    started = time.perf_counter()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=None, epoch=0, loss=0.0)

        def on_progress(s: ClassifierStep) -> None:
            progress.update(task, completed=s.step, total=s.total, epoch=s.epoch, loss=s.loss)

        model = train_classifier(
            train_data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            augment=args.augment,
            lr=args.lr,
            on_progress=on_progress,
        )
    seconds = time.perf_counter() - started
    test_accuracy = accuracy(model, test_data)
    card = ClassifierCard(
        name=args.name,
        config=model.cfg,
        test_accuracy=round(test_accuracy, 4),
        test_split=f"fashion-mnist test ({len(test_data)} images)",
        training={
            "command": shlex.join(["python", "-m", "models.classifier", *args_list]),
            "data": f"fashion-mnist train ({len(train_data)} images)",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "lr": args.lr,
            "augment": args.augment,
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    )
    save_classifier(args.out, model, card)
    console.print(f"test accuracy {test_accuracy:.4f} after {seconds:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
