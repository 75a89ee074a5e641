"""Class-conditional VAE: a conv encoder q(z|x,y) and decoder p(x|z,y), both told the label through an embedding.

The decoder is a Bernoulli likelihood over pixels in [0, 1] (binary cross-entropy on logits), the sharpest of the
simple choices here. Fashion-MNIST is mostly saturated black background around sharp-edged garments, and what
blurs VAE samples is the reconstruction term losing to the KL term. A pixel drawn at 0.5 that should be 0 or 1
costs ln 2 = 0.69 nats under BCE but 0.125 under a unit-variance Gaussian (MSE / 2), so the Gaussian, against the
same KL, settles for smooth averages. L1 is a Laplace likelihood with the same problem: its scale, i.e. its weight
against the KL, is a free guess. The image served is the decoder mean, ``sigmoid(logits)``.

Serving only needs the :class:`Decoder`. Neither network has a normalisation layer, so image i depends only on
(weights, label i, seed i), never on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.cgan import latents_for_seeds
from models.config import JsonConfig
from models.errors import InvalidModelConfig
from models.invariant import BatchInvariantConv2d, BatchInvariantLinear
from models.layout import LAYOUTS, check_image_config

ARCH = "cvae"

PRIORS = ("standard", "class-gaussian")


@dataclass(frozen=True)
class CVAEConfig(JsonConfig):
    """Everything needed to rebuild the networks; stored as JSON beside the weights."""

    class_names: tuple[str, ...]
    resolution: int = 28
    channels: int = 1
    z_dim: int = 16  # small: prior samples land where the decoder has seen posteriors
    width: int = 32  # conv width at full resolution; doubles per level down (at most 8x)
    embed_dim: int = 16  # label embedding fed to the decoder beside z
    # Where sampling draws z: "standard" is the training prior N(0, I); "class-gaussian" is a Gaussian per class
    # fitted to the encoder's aggregate posterior after training (see fit_class_prior).
    prior: str = "standard"
    arch: str = field(default=ARCH)

    def __post_init__(self) -> None:
        if self.arch != ARCH:
            raise InvalidModelConfig(f"a CVAEConfig needs arch {ARCH!r}, got {self.arch!r}")
        check_image_config(self.resolution, self.channels, self.class_names)
        if self.prior not in PRIORS:
            raise InvalidModelConfig(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        for name in ("z_dim", "width", "embed_dim"):
            if getattr(self, name) < 1:
                raise InvalidModelConfig(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def widths(self) -> list[int]:
        """Channel widths from full resolution down to the base map, e.g. [32, 64, 128] at 28 px."""
        _, levels = LAYOUTS[self.resolution]
        return [self.width * 2 ** min(i, 3) for i in range(levels + 1)]


class Encoder(nn.Module):
    """images (B, C, H, W) in [0, 1] and labels (B,) -> posterior mean and log-variance, each (B, z_dim).

    The label enters as one extra input plane (a learned H x W map per class).
    """

    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()
        base, _ = LAYOUTS[cfg.resolution]
        self.label_plane = nn.Embedding(cfg.num_classes, cfg.resolution * cfg.resolution)
        self.stem = nn.Conv2d(cfg.channels + 1, widths[0], 3, padding=1)
        self.downs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(len(widths) - 1)
        )
        self.head = nn.Linear(widths[-1] * base * base, 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.cfg.resolution
        plane = self.label_plane(y).view(-1, 1, r, r)  # (B, 1, H, W)
        h = F.leaky_relu(self.stem(torch.cat([x, plane], dim=1)), 0.2)  # (B, w0, H, W)
        for down in self.downs:
            h = F.leaky_relu(down(h), 0.2)  # (B, w_{i+1}, H/2, W/2)
        mu, logvar = self.head(h.flatten(1)).chunk(2, dim=1)  # (B, z_dim) each
        return mu, logvar


class Decoder(nn.Module):
    """z (B, z_dim) and labels (B,) -> images (B, C, H, W) in [-1, 1]; :meth:`logits` gives the raw outputs."""

    prior_mean: torch.Tensor  # (num_classes, z_dim), class-gaussian prior only
    prior_scale_tril: torch.Tensor  # (num_classes, z_dim, z_dim), lower-triangular

    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()[::-1]  # base map first, e.g. [128, 64, 32] at 28 px
        self.base, _ = LAYOUTS[cfg.resolution]
        self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim)
        self.fc = BatchInvariantLinear(cfg.z_dim + cfg.embed_dim, widths[0] * self.base * self.base)
        # 4x4 stride-2 transposed convs (DCGAN's up-sampler): half the cost of upsample + 3x3 conv on a CPU
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(len(widths) - 1)
        )
        self.out = BatchInvariantConv2d(widths[-1], cfg.channels, 3, padding=1)
        if cfg.prior == "class-gaussian":  # N(0, I) until fit_class_prior fills them; saved with the weights
            k, z = cfg.num_classes, cfg.z_dim
            self.register_buffer("prior_mean", torch.zeros(k, z))
            self.register_buffer("prior_scale_tril", torch.eye(z).repeat(k, 1, 1))

    def latents(self, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Prior samples z (B, z_dim) from standard normal draws ``eps`` (B, z_dim) for ``labels`` (B,).

        With the class-gaussian prior, z = mean_y + L_y eps (L_y the Cholesky factor of class y's covariance),
        computed per sample, so image i still depends only on its own label and seed.
        """
        if self.cfg.prior == "standard":
            return eps
        mean, tril = self.prior_mean[labels], self.prior_scale_tril[labels]  # (B, z), (B, z, z)
        return mean + torch.bmm(tril, eps.unsqueeze(-1)).squeeze(-1)

    def logits(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, C, H, W) of every pixel being white."""
        h = F.leaky_relu(self.fc(torch.cat([z, self.embed(y)], dim=1)), 0.2)  # (B, w_base * base * base)
        h = h.view(z.shape[0], -1, self.base, self.base)  # (B, w_base, base, base)
        for up in self.ups:
            h = F.leaky_relu(up(h), 0.2)  # (B, w_{i+1}, 2H, 2W)
        return self.out(h)  # (B, C, R, R)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z, y)) * 2.0 - 1.0  # (B, C, R, R): the mean image, in [-1, 1]


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) drawn from ``rng``; shapes (B, z_dim)."""
    eps = torch.randn(mu.shape, generator=rng, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x,y) || N(0, I)) in nats per image, (B,), for diagonal Gaussians."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood in nats per image, (B,); target (B, C, H, W) in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(dim=1)


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """KL warm-up: the weight rises linearly from 0 at step 0 to ``beta`` at ``warmup_steps``, then stays there.

    Starting at 0 lets the decoder learn to use z before the KL term can pull every posterior onto the prior
    (posterior collapse). ``step`` counts updates already made; ``warmup_steps=0`` means no warm-up.
    """
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


@torch.no_grad()
def sample_images(decoder: Decoder, labels: list[int], seeds: list[int]) -> torch.Tensor:
    """Decode prior samples: labels (B,) and seeds (B,) -> float images (B, C, H, W) in [-1, 1] on the CPU.

    The normal draw for image i comes from its own seeded generator (:func:`models.cgan.latents_for_seeds`) and
    is mapped through the decoder's prior (:meth:`Decoder.latents`).
    """
    device = next(decoder.parameters()).device
    eps = latents_for_seeds(seeds, decoder.cfg.z_dim).to(device)  # (B, z_dim)
    y = torch.tensor(labels, dtype=torch.long, device=device)  # (B,)
    z = decoder.latents(y, eps)  # (B, z_dim)
    was_training = decoder.training
    decoder.eval()
    images = decoder(z, y).cpu()
    decoder.train(was_training)
    return images


@torch.no_grad()
def fit_class_prior(
    encoder: Encoder, decoder: Decoder, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> None:
    """Fit the decoder's class-gaussian prior to the encoder's aggregate posterior ("ex-post density estimation",
    Ghosh et al. 2020, "From variational to deterministic autoencoders").

    A VAE's KL term never pulls the aggregate posterior q(z|y) exactly onto N(0, I): N(0, I) has holes where no
    training image's posterior lies, and decoding from them gives the blurred in-between images that a classifier
    cannot name. Sampling from the moment-matched Gaussian of each class's aggregate posterior, mean E[mu] and
    covariance Cov(mu) + E[diag sigma^2], stays where the decoder was trained.

    Args:
        images: float (N, C, H, W) in [0, 1]; labels: (N,) class indices; every class needs at least two images.

    Raises:
        InvalidModelConfig: the decoder was not built with ``prior="class-gaussian"``, or a class has too few images.
    """
    if decoder.cfg.prior != "class-gaussian":
        raise InvalidModelConfig(f"the decoder's prior is {decoder.cfg.prior!r}; fitting needs 'class-gaussian'")
    was_training = encoder.training
    encoder.eval()
    mus, variances = [], []
    for start in range(0, len(images), batch_size):
        mu, logvar = encoder(images[start : start + batch_size], labels[start : start + batch_size])  # (b, z) each
        mus.append(mu)
        variances.append(logvar.exp())
    encoder.train(was_training)
    mu_all, var_all = torch.cat(mus), torch.cat(variances)  # (N, z) each
    z = decoder.cfg.z_dim
    for c, name in enumerate(decoder.cfg.class_names):
        mask = labels == c
        if int(mask.sum()) < 2:
            raise InvalidModelConfig(f"class {name!r} has {int(mask.sum())} images; fitting its prior needs 2")
        mu_c = mu_all[mask]  # (n_c, z)
        # A small ridge keeps the factorisation defined for a latent dimension the encoder never uses.
        cov = torch.cov(mu_c.T).reshape(z, z) + torch.diag(var_all[mask].mean(0)) + 1e-5 * torch.eye(z)
        decoder.prior_mean[c] = mu_c.mean(0)
        decoder.prior_scale_tril[c] = torch.linalg.cholesky(cov)
