"""Transfer learning: fine-tune a published cGAN on a customer's (few) labelled images.

The recipe of the data-efficient GAN papers, on top of :mod:`models.train`'s hinge-loss step:

- start G *and* D from the published model (StyleGAN2-ADA's transfer learning); class rows are carried over by
  name, and a class the base never saw starts from the mean of the base's rows, the "average class";
- DiffAugment on every batch D sees, with a fixed p = 1 or an ADA-adapted p (:mod:`models.augment`);
- optionally FreezeD (Mo et al. 2020): the first ``freeze_d`` D blocks keep the base's low-level features;
- an EMA of G averaged from the first step: the base is already good.

The worker owns the loop (cancellation, uploads, progress) and drives a :class:`FineTuner` one step at a time.
A step is exactly one :func:`models.train.train_step_aug` call plus the batch draw; to compare it with a bare
PyTorch loop, time ``step_once`` against ``train_step_aug`` (or hand-written hinge steps) on the same state and
batch size: the only extras are indexing the uint8 data, two small host-to-device copies and the ADA update on
three floats that the step reads back in one synchronisation anyway.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from models import cgan, train
from models.augment import AdaController, AugmentConfig, diff_augment, host_to_device
from models.checkpoint import read_checkpoint
from models.config import JsonConfig
from models.data import LabelledImages
from models.errors import DatasetError, InvalidModelConfig, WeightsError
from models.generator import WEIGHTS_FILE, load_weights, read_config

# The projection embedding of D is spectrally normalised: its weight lives in the parametrization.
_D_EMBED = "embed.parametrizations.weight"


@dataclass(frozen=True)
class FineTuneConfig(JsonConfig):
    """Optimisation settings for fine-tuning; the defaults follow DiffAugment's few-shot transfer runs."""

    steps: int = 1000
    batch_size: int = 32  # drawn with replacement: a data set smaller than a batch is fine
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema_decay: float = 0.999
    ema_start: int = 0  # the base is already good: average from the start
    ema_rampup: float | None = 0.05  # StyleGAN2-ADA's: the EMA's half-life is at most 5 % of the steps so far
    seed: int = 0
    freeze_d: int = 0  # FreezeD: how many of D's first blocks keep the base's weights
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(policy=("translation", "cutout")))
    bn_recalibration_batches: int = 50  # of 100 samples each, at every export

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidModelConfig(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.freeze_d < 0:
            raise InvalidModelConfig(f"freeze_d must be 0 or more D blocks, got {self.freeze_d}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InvalidModelConfig(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def train_config(self) -> train.TrainConfig:
        """The :class:`models.train.TrainConfig` that :func:`models.train.train_step_aug` reads."""
        return train.TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr_g=self.lr_g,
            lr_d=self.lr_d,
            beta1=self.beta1,
            beta2=self.beta2,
            ema_decay=self.ema_decay,
            ema_start=self.ema_start,
            ema_rampup=self.ema_rampup,
            seed=self.seed,
            bn_recalibration_batches=self.bn_recalibration_batches,
        )


@dataclass(frozen=True)
class ClassMapping:
    """How the fine-tuned classes were initialised, for reporting."""

    reused: dict[str, int]  # class name -> its row in the base model
    new: tuple[str, ...]  # classes the base never saw: a blend of its rows (see init_from_base)
    nearest: dict[str, str] = field(default_factory=dict)  # new class -> the base class it leans on most


def init_from_base(
    base_dir: Path,
    class_names: Sequence[str],
    cfg: FineTuneConfig,
    device: str | torch.device = "cpu",
    data: LabelledImages | None = None,
) -> tuple[train.TrainState, cgan.CGANConfig, ClassMapping]:
    """Build a fine-tuning state from a published cGAN directory (``weights.safetensors`` + ``config.json``).

    G's weights are copied; every class-indexed tensor (each CBN gain and bias embedding in G, D's projection
    embedding) is rebuilt row by row: a class named in the base copies its row. In G a new class gets a blend of
    the base's rows, weighted by how much the base D's projection takes the new class's images (``data``) for each
    base class (a softmax over the standardised scores), so it starts near the base classes it resembles; without
    ``data`` or a base D, the mean of the base's rows. In D a new class's projection row starts fresh (random).
    D comes from ``discriminator.safetensors`` when the export has one, else starts fresh. The EMA G is a copy of
    G, the optimisers are fresh, and the first ``cfg.freeze_d`` D blocks are frozen and left out of D's optimiser.

    Args:
        class_names: the fine-tuning classes, in label order (need not be the base's).
        device: where the networks and optimiser states live.
        data: the fine-tuning images (its class names must be ``class_names``), to place the new classes.

    Like :func:`models.train.new_state`, it seeds the global RNG with ``cfg.seed`` to build the networks.

    Returns:
        The state, the new model config (the base's dimensions with ``class_names``) and the class mapping.

    Raises:
        InvalidModelConfig: the base is not a cGAN, ``class_names`` is empty or repeats a name, ``freeze_d`` exceeds
            D's blocks, or ``freeze_d`` > 0 for a base without a discriminator (freezing random layers is useless).
        WeightsError: a file is missing or does not match the config.
    """
    base_json = read_config(base_dir)
    if base_json["arch"] != cgan.ARCH:
        raise InvalidModelConfig(f"fine-tuning needs a {cgan.ARCH} base; {base_dir} is a {base_json['arch']}")
    base_cfg = cgan.CGANConfig.from_json(base_json)
    model_cfg = dataclasses.replace(base_cfg, class_names=tuple(class_names))
    base_g = cgan.Generator(base_cfg)
    load_weights(base_g, base_dir / WEIGHTS_FILE)
    base_d: cgan.Discriminator | None = None
    if (base_dir / train.DISCRIMINATOR_FILE).is_file():
        base_d = cgan.Discriminator(base_cfg)
        load_weights(base_d, base_dir / train.DISCRIMINATOR_FILE)
    elif cfg.freeze_d > 0:
        raise InvalidModelConfig(
            f"freeze_d={cfg.freeze_d} needs the base's discriminator, but {base_dir} has no "
            f"{train.DISCRIMINATOR_FILE} (re-export the base with the current trainer, or set freeze_d=0)"
        )

    blends = _new_class_blends(base_d, data, base_cfg.class_names) if base_d is not None and data is not None else {}
    rows: list[int | torch.Tensor | None] = [
        base_cfg.class_names.index(n) if n in base_cfg.class_names else blends.get(n) for n in model_cfg.class_names
    ]
    torch.manual_seed(cfg.seed)
    g, d = cgan.Generator(model_cfg), cgan.Discriminator(model_cfg)
    g.load_state_dict(_transfer(base_g.state_dict(), g.state_dict(), _cbn_keys(g), rows), strict=True)
    if base_d is not None:
        # D's projection row of a new class starts fresh (random, as in a new D): rows blended like G's start nearly
        # alike, and a projection that cannot tell the new classes apart teaches G no class (measured in
        # docs/models.md: label consistency 0.40 with blended D rows, 0.74 with fresh ones).
        d_rows = [r if isinstance(r, int) else None for r in rows]
        d_state = _transfer(base_d.state_dict(), d.state_dict(), {f"{_D_EMBED}.original"}, d_rows, keep_fresh=True)
        _set_singular_vectors(d_state, _D_EMBED)
        d.load_state_dict(d_state, strict=True)
    state = _new_state(g.to(device), d.to(device), cfg)
    mapping = ClassMapping(
        reused={n: r for n, r in zip(model_cfg.class_names, rows, strict=True) if isinstance(r, int)},
        new=tuple(n for n, r in zip(model_cfg.class_names, rows, strict=True) if not isinstance(r, int)),
        nearest={n: base_cfg.class_names[int(w.argmax())] for n, w in blends.items()},
    )
    return state, model_cfg, mapping


class FineTuner:
    """Fine-tuning driven one step at a time: augmentation, ADA, checkpoints with exact resume, export."""

    def __init__(
        self,
        state: train.TrainState,
        model_cfg: cgan.CGANConfig,
        data: LabelledImages,
        cfg: FineTuneConfig,
    ) -> None:
        """Raises DatasetError when ``data`` does not fit the model (class names, channels, resolution)."""
        _check_data(data, model_cfg)
        self.state = state
        self.model_cfg = model_cfg
        self.data = data
        self.cfg = cfg
        self.ada = AdaController(cfg.augment)
        self._train_cfg = cfg.train_config()
        self._device = state.g.fc.weight.device
        self._rate_from: tuple[float, int] | None = None  # (time, step) of the first step_once call
        state.g.train()
        state.d.train()

    @property
    def step(self) -> int:
        """Steps done so far (the base counts as step 0)."""
        return self.state.step

    @property
    def done(self) -> bool:
        """Whether ``cfg.steps`` steps have been done."""
        return self.state.step >= self.cfg.steps

    @property
    def augment_p(self) -> float | None:
        """The current augmentation probability (ADA moves it); None when the policy is empty."""
        return self.ada.p if self.cfg.augment.policy else None

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.cfg.augment.policy, self.ada.p, self.state.rng)

    def step_once(self) -> train.StepStats:
        """One D + G step on a batch drawn (with replacement) from ``state.rng``, then the ADA update.

        Returns StepStats whose ``steps_per_s`` counts from the first call and whose ``augment_p`` is the
        augmentation probability after the step (None without a policy).
        """
        if self._rate_from is None:
            self._rate_from = (time.perf_counter(), self.state.step)
        idx = torch.randint(0, len(self.data), (self.cfg.batch_size,), generator=self.state.rng)  # (B,)
        real = host_to_device(self.data.images[idx], self._device).float() / 127.5 - 1.0  # (B, C, H, W) in [-1, 1]
        labels = host_to_device(self.data.labels[idx], self._device)  # (B,)
        augment = self._augment if self.cfg.augment.policy else None
        result = train.train_step_aug(self.state, real, labels, self._train_cfg, augment=augment)
        self.ada.update(result.real_sign, self.cfg.batch_size)
        started, started_step = self._rate_from
        rate = (self.state.step - started_step) / max(time.perf_counter() - started, 1e-9)
        return train.StepStats(
            self.state.step,
            self.cfg.steps,
            result.d_loss,
            result.g_loss,
            rate,
            augment_p=self.augment_p,
        )

    def save_checkpoint(self, path: Path) -> None:
        """Write G, D, EMA G, both Adam states, the RNG, the step, both configs and the ADA state (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"model": self.model_cfg.to_json(), "finetune": self.cfg.to_json(), "ada": self.ada.state()}
        train.write_state(path, self.state, header)

    @classmethod
    def load_checkpoint(
        cls,
        path: Path,
        data: LabelledImages,
        cfg: FineTuneConfig,
        device: str | torch.device = "cpu",
    ) -> FineTuner:
        """Resume from :meth:`save_checkpoint`: the next steps equal those of an uninterrupted run.

        ``cfg`` may change ``steps`` (to train longer), not ``freeze_d`` (the optimiser state depends on it).

        Raises:
            WeightsError: ``path`` is unreadable or not a fine-tuning checkpoint.
            InvalidModelConfig: ``cfg.freeze_d`` differs from the checkpoint's.
            DatasetError: ``data`` does not fit the model.
        """
        header, tensors = read_checkpoint(path)
        if "finetune" not in header:
            raise WeightsError(f"{path} is not a fine-tuning checkpoint (no 'finetune' in its header)")
        saved = FineTuneConfig.from_json(header["finetune"])
        if saved.freeze_d != cfg.freeze_d:
            raise InvalidModelConfig(f"{path} was trained with freeze_d={saved.freeze_d}, got freeze_d={cfg.freeze_d}")
        model_cfg = cgan.CGANConfig.from_json(header["model"])
        state = _new_state(cgan.Generator(model_cfg).to(device), cgan.Discriminator(model_cfg).to(device), cfg)
        train.restore_state(state, header, tensors)
        tuner = cls(state, model_cfg, data, cfg)
        if saved.augment.ada_target is not None and cfg.augment.ada_target is not None:
            tuner.ada.load_state(header["ada"])
        return tuner

    def sample_grid(self, seeds: Sequence[int]) -> torch.Tensor:
        """uint8 EMA samples (num_classes * len(seeds), C, H, W), one row per class (see models.grid.class_grid)."""
        return train.sample_grid_images(self.state.ema, self.model_cfg, list(seeds))

    def export(self, directory: Path) -> None:
        """A servable model directory: EMA G with recalibrated BN, config.json and discriminator.safetensors."""
        train.export(self.state, self.model_cfg, directory, self.cfg.bn_recalibration_batches)


def _new_state(g: cgan.Generator, d: cgan.Discriminator, cfg: FineTuneConfig) -> train.TrainState:
    """EMA copy of G, FreezeD, fresh optimisers over what trains, and the data/noise/augmentation RNG."""
    blocks = len(d.blocks)
    if cfg.freeze_d > blocks:
        raise InvalidModelConfig(f"freeze_d={cfg.freeze_d} but the discriminator has {blocks} blocks (0..{blocks})")
    for block in list(d.blocks)[: cfg.freeze_d]:
        block.requires_grad_(False)
    ema = copy.deepcopy(g).eval()
    ema.requires_grad_(False)
    betas = (cfg.beta1, cfg.beta2)
    return train.TrainState(
        g=g,
        d=d,
        ema=ema,
        opt_g=torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=betas),
        opt_d=torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=cfg.lr_d, betas=betas),
        rng=torch.Generator().manual_seed(cfg.seed),
    )


def _cbn_keys(g: cgan.Generator) -> set[str]:
    """State-dict keys of G's class-indexed tensors: every conditional BN's gain and bias embedding."""
    return {
        f"{name}.{part}.weight"
        for name, module in g.named_modules()
        if isinstance(module, cgan.ConditionalBatchNorm2d)
        for part in ("gain", "bias")
    }


def _class_rows(
    base: torch.Tensor, rows: Sequence[int | torch.Tensor | None], fresh: torch.Tensor | None = None
) -> torch.Tensor:
    """(K_base, F) -> (K_new, F): row i is ``base[rows[i]]`` for an index, ``rows[i] @ base`` for a (K_base,)
    weight vector, and where None ``fresh[i]`` if given, else the mean of the base's rows."""
    mean = base.mean(dim=0)  # (F,)
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, int):
            out.append(base[r].clone())
        elif r is None:
            out.append(fresh[i].clone() if fresh is not None else mean)
        else:
            out.append(r.to(base.dtype) @ base)  # (F,)
    return torch.stack(out)


@torch.no_grad()
def _new_class_blends(
    base_d: cgan.Discriminator, data: LabelledImages, base_names: Sequence[str], per_class: int = 256
) -> dict[str, torch.Tensor]:
    """For each class of ``data`` the base does not know: softmax weights (K_base,) over the base's classes.

    The score of base class k is the base D's projection term for the class's mean image features, <e_k, h>;
    standardised across k, then a softmax: the new class starts nearest the classes D takes its images for.
    """
    base_d.eval()
    rows = cast(torch.Tensor, base_d.embed.weight)  # (K_base, F), spectrally normalised as D uses it
    blends: dict[str, torch.Tensor] = {}
    for c, name in enumerate(data.class_names):
        if name in base_names:
            continue
        idx = torch.nonzero(data.labels == c).squeeze(1)[:per_class]
        if idx.numel() == 0:
            continue
        h = base_d.features(data.images[idx].float() / 127.5 - 1.0).mean(dim=0)  # (F,)
        scores = rows @ h  # (K_base,)
        z = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8)
        blends[name] = torch.softmax(z, dim=0)
    return blends


def _transfer(
    base: dict[str, torch.Tensor],
    fresh: dict[str, torch.Tensor],
    class_keys: set[str],
    rows: Sequence[int | torch.Tensor | None],
    keep_fresh: bool = False,
) -> dict[str, torch.Tensor]:
    """The fresh state dict's keys with the base's values: ``class_keys`` remapped by row, the rest copied.

    With ``keep_fresh`` a None row keeps the fresh network's row instead of the base's mean.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in fresh.items():
        if key in class_keys:
            out[key] = _class_rows(base[key], rows, value if keep_fresh else None)
        elif base[key].shape == value.shape:
            out[key] = base[key].clone()
        else:  # only the spectral-norm vectors of a class-indexed weight; reset by _set_singular_vectors
            out[key] = value
    return out


@torch.no_grad()
def _set_singular_vectors(state: dict[str, torch.Tensor], prefix: str) -> None:
    """Set a spectral-norm parametrization's power-iteration vectors to the exact top singular pair.

    The remapped weight has new rows, so the base's ``_u`` does not fit it (nor its shape, when the class count
    changed); the exact pair makes the very first forward divide by the right sigma.
    """
    weight = state[f"{prefix}.original"]  # (K, F): nn.Embedding, spectral norm over dim 0
    u, _, vh = torch.linalg.svd(weight, full_matrices=False)
    state[f"{prefix}.0._u"] = u[:, 0].contiguous()  # (K,)
    state[f"{prefix}.0._v"] = vh[0].contiguous()  # (F,)


def _check_data(data: LabelledImages, model_cfg: cgan.CGANConfig) -> None:
    if len(data) == 0:
        raise DatasetError("the fine-tuning data set is empty")
    if tuple(data.class_names) != model_cfg.class_names:
        raise DatasetError(
            f"data classes {list(data.class_names)} differ from the model's {list(model_cfg.class_names)}"
        )
    image_shape = tuple(data.images.shape[1:])
    model_shape = (model_cfg.channels, model_cfg.resolution, model_cfg.resolution)
    if image_shape != model_shape:
        raise DatasetError(
            f"data images are {'x'.join(map(str, image_shape))} (C x H x W) but the base model makes "
            f"{'x'.join(map(str, model_shape))}: resize the images to the base's channels and resolution"
        )
    if data.images.dtype != torch.uint8:
        raise DatasetError(f"data images must be uint8, got {data.images.dtype}")
