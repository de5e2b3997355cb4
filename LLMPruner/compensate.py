"""Output compensation: after a consumer layer loses input channels, keep its output on calibration data.

For a linear layer ``y = W x`` whose input channels ``R`` are removed and ``K`` kept:

* ``bias`` (FLAP's baseline compensation): ``b += W[:, R] @ mean(x_R)`` — exact whenever the removed
  inputs are constant. Adds bias tensors: the adapter switches the architecture's bias flags on (zero
  biases elsewhere) so the checkpoint still loads with stock classes, but it is no longer the original
  bias-free architecture.
* ``refit`` (least squares, ridge-regularised): ``W_K <- W G[:, K] (G_KK + lam I)^-1`` with the Gram
  matrix ``G = sum x x^T`` of calibration inputs, which minimises ``sum_t ||W x_t - W_K x_t,K||^2``. No new
  tensors: the architecture stays stock. **Recommended.**
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn

from .activations import InputStats
from .adapters import get_adapter
from .plan import PruningPlan

logger = logging.getLogger(__name__)

Compensation = Literal["none", "bias", "refit"]
COMPENSATIONS = ("none", "bias", "refit")


@torch.no_grad()
def compensate(model: nn.Module, plan: PruningPlan, stats: dict[str, InputStats], method: Compensation,
               ridge: float = 1e-3) -> dict[str, torch.Tensor]:
    """Call *before* the plan is applied. ``refit`` rewrites the kept columns in place; ``bias`` returns
    ``{module name: bias delta}`` for ``add_biases`` to add *after* the plan (the new biases must not
    exist while the plan slices the other projections)."""
    if method in ("none", None):
        return {}
    if method not in COMPENSATIONS:
        raise ValueError(f"--compensation {method!r}: choose one of {', '.join(COMPENSATIONS)}")
    params = dict(model.named_parameters())
    deltas = {}
    for name, s in stats.items():
        keep = plan.keep.get(name, {}).get(1)
        if keep is None or len(keep) == params[name].shape[1]:
            continue
        w = params[name]
        kept = torch.as_tensor(keep)
        removed = torch.as_tensor(sorted(set(range(w.shape[1])) - set(keep)))
        if method == "bias":
            deltas[name.rpartition(".")[0]] = w[:, removed].detach().double().cpu() @ s.mean[removed].cpu()
        else:
            w[:, kept] = refit_weight(w.detach().double().cpu(), s.gram.cpu(), kept, ridge).to(w.dtype).to(w.device)
    logger.info("%s compensation of %d layers", method, len(deltas) if method == "bias" else len(stats))
    return deltas


@torch.no_grad()
def add_biases(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add bias deltas (from ``compensate(..., "bias")``), creating the biases the architecture allows."""
    adapter = get_adapter(model)
    for module_name, delta in deltas.items():
        module = model.get_submodule(module_name)
        if module.bias is None:
            adapter.enable_biases(model, adapter.kind_of(module_name + ".weight"))
        module.bias += delta.to(module.bias.dtype).to(module.bias.device)


def refit_weight(w: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_V sum_t ||W x_t - V x_t[kept]||^2 + lam ||V||^2`` = ``W G[:, K] (G_KK + lam I)^-1``."""
    g_kk = gram[kept][:, kept]
    lam = ridge * g_kk.diagonal().mean().clamp_min(1e-12)
    a = g_kk + lam * torch.eye(len(kept), dtype=gram.dtype)
    rhs = (w @ gram[:, kept]).T                                  # [K, out]
    return torch.linalg.solve(a, rhs).T                          # [out, K]

