"""Layers whose output for one sample does not depend on the batch it rides in.

genq promises that the same (model version, label, seed) gives the same image whatever batch it is sampled in. On
the CPU that needs every image summed in the same order whatever the batch, and torch's defaults do not quite:
BLAS picks a matrix product's kernel by its row count (a 1-row product takes another path than a 64-row one), and
torch runs a small convolution of a 1-image batch with its own kernel instead of oneDNN's. The layers here take one
path for every batch when sampling on the CPU; the sampler pads odd batches to even for the last case, oneDNN's
transposed convolutions split between two threads mid-image (models.generator). Before them, 8 of 512 images of
the shipped cGAN sampled alone were a grey level off their twins in a batch of 512 (float differences up to 7e-6 in
every image, most rounding to the same byte); with them, none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _exact_cpu_sampling(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` is sampling in fp32 on the CPU, eagerly: where the batch-invariant path applies. Training
    (gradients on), compiled graphs, autocast and other devices (where kernels vary with the batch anyway) take
    torch's own path."""
    return not (
        torch.compiler.is_compiling()  # first: what follows would break a traced graph
        or module.training
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or torch.is_autocast_enabled("cpu")
    )


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that, when sampling on the CPU, computes the batch as products
    of exactly ``ROWS`` rows each (the last one padded with zeros), each on a fresh, aligned copy: the same kernel on
    the same memory layout whatever the batch, so row i's output is bit-identical alone or in any batch (a row's sums
    do not depend on its place among the ``ROWS``: tested). One row per product would hold by construction too, but
    reads the whole weight matrix once per row: it cost the shipped 28 px cGAN 8-14 % of its images/s at batch 256,
    against 2-5 % this way (nothing measurable for the 64x64 configuration).
    """

    ROWS = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _exact_cpu_sampling(self, x) or x.shape[0] == 0:
            return F.linear(x, self.weight, self.bias)
        parts = []
        for i in range(0, x.shape[0], self.ROWS):
            rows = x[i : i + self.ROWS]
            rows = torch.cat([rows, rows.new_zeros(self.ROWS - rows.shape[0], rows.shape[1])])  # fresh (ROWS, in)
            parts.append(F.linear(rows, self.weight, self.bias))  # (ROWS, out)
        return torch.cat(parts)[: x.shape[0]]  # (B, out)


class BatchInvariantConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) that, when sampling on the CPU, calls oneDNN's convolution
    for every batch size: torch's own choice runs a small input of one image with another kernel, so an image
    sampled alone came out a last bit off the same image in a batch (as fast: 0.61 vs 0.58 ms for a 256-channel
    8x8 convolution of one image)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mkldnn_convolution takes zero padding given as numbers only ("same" and the other modes: torch's path)
        if (
            not _exact_cpu_sampling(self, x)
            or isinstance(self.padding, str)
            or self.padding_mode != "zeros"
            or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
        ):
            return super().forward(x)
        return torch.mkldnn_convolution(  # (B, C_out, H', W')
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )
