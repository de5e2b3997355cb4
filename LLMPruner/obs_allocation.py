"""Per-layer unit counts from structured-OBS errors (non-uniform allocation, OWL / SlimGPT-style).

On the dense model's calibration inputs, for each family (e.g. the MLP of one layer), greedy structured
OBS (``obs.obs_select``) removes up to ``max_fraction`` of its units and records the error of each
removal. Errors of different layers are made comparable by dividing by a per-layer scale:

* ``residual``: the layer's output hidden states' ``sum ||h||^2`` on the same tokens (the next layers see
  the residual stream through RMSNorm, so what matters is the error relative to it);
* ``normalized``: none (scale 1), but every token's error is divided by its own ``||h_t||^2 / d`` (the
  layer's output hidden state's mean square): the error the next layer's RMSNorm passes on, so tokens
  with huge residual norms (attention sinks) do not dominate (``normalized_grams``);
* ``output``: the consumer's own output ``sum ||W x||^2`` (the relative reconstruction error);
* ``fisher``: none (scale 1): the errors are Fisher-weighted (``obs_fisher.py``), estimates of the loss
  change, comparable as they are;
* ``kl``: no proxy: each layer's damage is measured, the KL divergence from the dense model with that
  layer alone pruned at several levels (``obs_measured.py``).

Then the total number of units that the budget removes is spent where the scaled marginal error is
smallest (one unit at a time, the next cheapest removal of any family). All families must have the
same unit cost (the budget stays exact); the counts then go to the sequential OBS pass.
"""
from __future__ import annotations

import heapq
import logging
from typing import Literal

import torch
import torch.nn as nn

from .activations import collect_input_stats, consumers
from .adapters import get_adapter
from .budget import unit_cost
from .graph import Family
from .obs import DAMP, consumer_columns, obs_select

logger = logging.getLogger(__name__)

Allocation = Literal["uniform", "residual", "normalized", "output", "fisher", "kl"]
ALLOCATIONS = ("uniform", "residual", "normalized", "output", "fisher", "kl")


@torch.no_grad()
def _forward_all(model: nn.Module, examples: torch.Tensor, batch_size: int, handles: list) -> None:
    """Run ``examples`` through ``model`` batch by batch (for the hooks' sake), then remove ``handles``."""
    try:
        device = next(model.parameters()).device
        for s in range(0, len(examples), batch_size):
            model(input_ids=examples[s:s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def normalized_grams(model: nn.Module, cons: dict[str, nn.Linear], examples: torch.Tensor,
                     batch_size: int) -> dict[str, torch.Tensor]:
    """``{consumer: sum_t x_t x_t^T / ms(h_t)}``, ``ms(h_t)`` the mean square of the consumer's layer's
    output hidden state at token ``t`` (float64)."""
    layers = get_adapter(model).decoder_layers(model)
    owner = {name: next(i for i, layer in enumerate(layers) if any(m is mod for m in layer.modules()))
             for name, mod in cons.items()}
    seen: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}

    def grab(name):
        return lambda m, a: seen.__setitem__(name, a[0].detach())

    def weigh(i):
        def fn(module, args, y):
            h = (y[0] if isinstance(y, tuple) else y).double()
            w = h.pow(2).mean(-1).clamp_min(1e-12).rsqrt()               # [B, T]: 1 / rms(h_t)
            for name, li in owner.items():
                if li == i:
                    x = seen.pop(name).double() * w[..., None]
                    x = x.reshape(-1, x.shape[-1])
                    grams[name] = grams.get(name, 0) + (x.T @ x).cpu()
        return fn

    handles = [mod.register_forward_pre_hook(grab(name)) for name, mod in cons.items()]
    handles += [layers[i].register_forward_hook(weigh(i)) for i in set(owner.values())]
    _forward_all(model, examples, batch_size, handles)
    return grams


@torch.no_grad()
def _residual_scale(model: nn.Module, examples: torch.Tensor, batch_size: int) -> dict[int, float]:
    layers = get_adapter(model).decoder_layers(model)
    out: dict[int, float] = {}

    def hook(i):
        def fn(module, args, y):
            h = y[0] if isinstance(y, tuple) else y
            out[i] = out.get(i, 0.0) + float(h.double().pow(2).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    _forward_all(model, examples, batch_size, handles)
    return out


def allocate(curves: dict[str, list[float]], scale: dict[str, float], total: int) -> dict[str, int]:
    """Spend ``total`` removals on the families' error curves (``curves[key][k]``: the error of the
    ``k+1``-th removal), cheapest scaled marginal error first."""
    heap = [(c[0] / scale[k], k, 0) for k, c in curves.items() if c]
    heapq.heapify(heap)
    counts = {k: 0 for k in curves}
    capacity = sum(len(c) for c in curves.values())
    if total > capacity:
        raise ValueError(f"OBS allocation: {total} units to remove but only {capacity} allowed "
                         f"(raise max_fraction or lower the budget)")
    for _ in range(total):
        _, k, i = heapq.heappop(heap)
        counts[k] = i + 1
        if i + 1 < len(curves[k]):
            heapq.heappush(heap, (curves[k][i + 1] / scale[k], k, i + 1))
    return counts


@torch.no_grad()
def obs_counts(model: nn.Module, families: list[Family], removed: dict[str, list[int]],
               examples: torch.Tensor, how: Allocation, damp: float = DAMP, batch_size: int = 8,
               max_fraction: float | None = None,
               fisher: dict[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Redistribute the units of ``removed`` (``{family: units}``) across ``families`` by scaled OBS
    error; returns ``{family: placeholder units}`` whose *counts* the sequential OBS pass uses. A family
    loses at most ``max_fraction`` of its units (default: 0.6, or the mean fraction removed + 0.15 if
    that is larger)."""
    if how == "uniform":
        return removed
    if how == "fisher" and fisher is None:
        raise ValueError("OBS allocation 'fisher' needs the Fisher factors (obs_fisher.output_fisher)")
    if how not in ALLOCATIONS:
        raise ValueError(f"--obs_allocation {how!r}: choose one of {', '.join(ALLOCATIONS)}")
    costs = {unit_cost(model, f) for f in families}
    if len(costs) != 1:
        raise ValueError(f"--obs_allocation {how}: the families' units cost different parameter counts "
                         f"({sorted(costs)}); prune one kind (e.g. --skip_attention) or use uniform")
    total = sum(len(v) for v in removed.values())
    if max_fraction is None:
        max_fraction = max(0.6, total / sum(f.n_units for f in families) + 0.15)
    if how == "kl":
        from .obs_measured import measured_curves  # imports the streamed-states helpers
        curves = measured_curves(model, families, examples, damp, batch_size, max_fraction)
        counts = allocate(curves, {k: 1.0 for k in curves}, total)
        logger.info("OBS allocation (kl): %s", counts)
        return {k: list(range(n)) for k, n in counts.items()}
    cons = consumers(model, families)
    if how == "normalized":
        grams = normalized_grams(model, cons, examples, batch_size)
    else:
        grams = {n: s.gram for n, s in collect_input_stats(model, cons, examples, batch_size, gram=True).items()}
    residual = _residual_scale(model, examples, batch_size) if how == "residual" else {}
    params = dict(model.named_parameters())
    curves, scale = {}, {}
    for fam in families:
        name = next(m.param for m in fam.members if m.dim == 1 and m.param in cons)
        w = params[name].detach().double().cpu()
        g = grams[name].cpu()
        n = min(fam.n_units - 1, int(max_fraction * fam.n_units))
        f = fisher.get(name) if fisher else None
        _, _, curves[fam.key] = obs_select(w, g, consumer_columns(fam, name), n, damp, fisher=f)
        scale[fam.key] = (residual[fam.layer] if how == "residual" else 1.0 if how in ("fisher", "normalized")
                          else float(((w @ g) * w).sum()))
    counts = allocate(curves, scale, total)
    logger.info("OBS allocation (%s): %s", how, {k: v for k, v in counts.items()})
    return {k: list(range(n)) for k, n in counts.items()}
