"""Training checkpoints as one safetensors file: every module, every optimizer state and the RNG, nothing pickled.

Tensors go in the file under ``<name>.<key>``; the step, the configs and the optimizers' param groups go in its JSON
metadata. Restoring is strict: every module key must match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.errors import WeightsError


def flatten_state(prefix: str, sd: Mapping[str, Any], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Put the tensors of a (nested) state dict into ``tensors`` as ``prefix.key`` and the rest into ``meta``."""
    for key, value in sd.items():
        name = f"{prefix}.{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().clone()
        elif isinstance(value, dict):
            flatten_state(name, value, tensors, meta)
        else:
            meta[name] = value


def write_checkpoint(
    path: Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    rng: torch.Generator,
    header: dict[str, Any],
) -> None:
    """Write modules, optimizers and the RNG to ``path`` atomically; ``header`` (JSON) carries step and configs."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, module in modules.items():
        flatten_state(name, module.state_dict(), tensors, meta)
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        flatten_state(f"{name}.state", {str(k): v for k, v in sd["state"].items()}, tensors, meta)
        meta[f"{name}.param_groups"] = sd["param_groups"]
    tensors["rng"] = rng.get_state()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"genq": json.dumps({**header, "extra": meta})})
    tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated checkpoint


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a checkpoint written by :func:`write_checkpoint`. Raises WeightsError."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {})["genq"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read checkpoint {path}: {exc}") from exc
    return header, tensors


def restore(
    header: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    rng: torch.Generator,
) -> None:
    """Load what :func:`read_checkpoint` returned into freshly built modules, optimizers and RNG (strictly)."""
    for name, module in modules.items():
        sd = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        module.load_state_dict(sd, strict=True)
    for name, opt in optimizers.items():
        prefix = f"{name}.state."
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, field = key[len(prefix) :].split(".", 1)
                opt_state.setdefault(int(idx), {})[field] = value
        opt.load_state_dict({"state": opt_state, "param_groups": header["extra"][f"{name}.param_groups"]})
    rng.set_state(tensors["rng"])
