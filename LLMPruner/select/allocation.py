"""Per-layer unit counts from structured-OBS errors (non-uniform allocation, OWL / SlimGPT-style).

On the dense model's calibration inputs, for each family (e.g. the MLP of one layer), greedy structured
OBS (``obs.obs_select``) removes up to ``max_fraction`` of its units and records the error of each
removal. Errors of different layers are made comparable by dividing by a per-layer scale:

* ``residual``: the layer's output hidden states' ``sum ||h||^2`` on the same tokens (the next layers see
  the residual stream through RMSNorm, so what matters is the error relative to it).

(The other scales tried — per-token normalised, the consumer's output, Fisher-weighted, and the measured
KL of each layer — lost to ``residual`` on SmolLM2 and were dropped: docs/tried_and_dropped.md.)

Then the total number of units that the budget removes is spent where the scaled marginal error is
smallest (one unit at a time, the next cheapest removal of any family). All families must have the
same unit cost (the budget stays exact); the counts then go to the sequential OBS pass.
"""
from __future__ import annotations

import heapq
import logging
from typing import Callable, Iterator, Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from LLMPruner.score.activations import consumers
from LLMPruner.adapters import get_adapter
from LLMPruner.select.budget import unit_cost
from LLMPruner.compensate.refit import linalg_place
from LLMPruner.discover import Family
from LLMPruner.select.obs import DAMP, consumer_columns, obs_select
from LLMPruner.compensate.sequential import layer_inputs

logger = logging.getLogger(__name__)

Allocation = Literal["uniform", "residual"]
from LLMPruner.options import ALLOCATIONS  # noqa: E402,F401  (re-exported)


@torch.no_grad()
def layer_grams(model: nn.Module, cons: dict[str, nn.Linear], examples: torch.Tensor, batch_size: int,
                device: str | torch.device | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor], float]]:
    """Per decoder layer that owns consumers, in order: ``(layer, {consumer: dense input Gram}, sum_t
    ||h_t||^2 of the layer's output)``, the Grams float64 on ``device`` (default: the host).

    The dense stream runs layer by layer from the first layer's inputs (``sequential.layer_inputs``),
    so only one layer's Grams exist at a time: one full forward with hooks on every consumer would hold
    them all at once, e.g. 24 x 1,536^2 float64 = 453 MB for SmolLM2's MLPs, 31 GB for LLaMA-7B's
    (11,008 wide), 526 GB for Llama-3-70B's. The layers after the last owner are not run."""
    layers = get_adapter(model).decoder_layers(model)
    batches = layer_inputs(model, examples, batch_size)
    hidden, kwargs_of = [h for h, _ in batches], [kw for _, kw in batches]
    del batches                                   # hidden[b] is replaced by each layer's output

    def forward(layer: nn.Module, b: int, h: torch.Tensor) -> torch.Tensor:
        y = layer(h, **kwargs_of[b])
        return y[0] if isinstance(y, tuple) else y
    yield from stream_grams(layers, cons, hidden, forward, device=device)


@torch.no_grad()
def stream_grams(layers: nn.ModuleList, cons: dict[str, nn.Linear], hidden: list[torch.Tensor],
                 forward: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
                 enter: Callable[[int], None] | None = None, leave: Callable[[int], None] | None = None,
                 device: str | torch.device | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor], float]]:
    """``layer_grams`` on a given dense stream: ``hidden`` (one tensor per batch, the first layer's
    inputs, replaced in place by each layer's outputs, kept on their device) goes through ``layers``
    with ``forward(layer, b, h)``. ``enter(i)`` / ``leave(i)`` run before layer ``i`` and after its
    tuple has been consumed (the layer-streamed pass loads and releases the layer's weights there, so
    they are loaded while the caller reads them). The Grams are summed where the activations are and
    kept on ``device`` (default: the host)."""
    where = linalg_place(device)
    owner = {name: _owner(layers, mod, name) for name, mod in cons.items()}
    for i, layer in enumerate(tqdm(layers[:max(owner.values()) + 1], desc="OBS allocation statistics",
                                   leave=False)):
        if enter is not None:
            enter(i)
        mine = {name: cons[name] for name, li in owner.items() if li == i}
        seen: dict[str, torch.Tensor] = {}
        handles = [mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach()))
                   for name, mod in mine.items()]
        grams: dict[str, torch.Tensor] = {}
        energy = 0.0
        try:
            for b in range(len(hidden)):
                y = forward(layer, b, hidden[b])
                hidden[b] = y.to(hidden[b].device)
                if not mine:
                    continue
                energy += float(y.double().pow(2).sum())
                for name in mine:
                    x = seen.pop(name).double()
                    x = x.reshape(-1, x.shape[-1])
                    grams[name] = grams.get(name, 0) + (x.T @ x).to(where)
        finally:
            for handle in handles:
                handle.remove()
        if mine:
            yield i, grams, energy
        del grams
        if leave is not None:
            leave(i)


def consumer_names(families: list[Family], cons: dict[str, nn.Linear]) -> dict[str, str]:
    """``{family key: the weight name of the linear layer whose input columns it prunes}``."""
    return {f.key: next(m.param for m in f.members if m.dim == 1 and m.param in cons) for f in families}


def _owner(layers: nn.ModuleList, module: nn.Module, name: str) -> int:
    for i, layer in enumerate(layers):
        if any(m is module for m in layer.modules()):
            return i
    raise ValueError(f"OBS allocation: {name} is not inside a decoder layer")


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
               grams_of: Callable[[], Iterator[tuple[int, dict[str, torch.Tensor], float]]] | None = None,
               device: str | torch.device | None = None) -> dict[str, list[int]]:
    """Redistribute the units of ``removed`` (``{family: units}``) across ``families`` by scaled OBS
    error; returns ``{family: placeholder units}`` whose *counts* the sequential OBS pass uses. A family
    loses at most ``max_fraction`` of its units (default: 0.6, or the mean fraction removed + 0.15 if
    that is larger). ``grams_of()``: the dense statistics as ``layer_grams`` yields them, from
    another stream (the layer-streamed pass's ``stream_grams``: each layer's consumer weights are read
    while its tuple is current); by default
    ``layer_grams`` on ``model``. ``device``: where the float64 curves are computed (default: the host;
    ``grams_of`` must then yield its Grams there)."""
    where = linalg_place(device)
    if how == "uniform":
        return removed
    if how not in ALLOCATIONS:
        raise ValueError(f"--obs_allocation {how!r}: choose one of {', '.join(ALLOCATIONS)}")
    costs = {unit_cost(model, f) for f in families}
    if len(costs) != 1:
        raise ValueError(f"--obs_allocation {how}: the families' units cost different parameter counts "
                         f"({sorted(costs)}); prune one kind (e.g. --skip_attention) or use uniform")
    total = sum(len(v) for v in removed.values())
    if max_fraction is None:
        max_fraction = max(0.6, total / sum(f.n_units for f in families) + 0.15)
    cons = consumers(model, families)
    consumer_of = consumer_names(families, cons)
    curves, scale = {}, {}
    grams = grams_of() if grams_of is not None else layer_grams(model, cons, examples, batch_size, device=where)
    for _, layer_g, energy in grams:
        for fam in families:  # this layer's families, while its Grams exist
            name = consumer_of[fam.key]
            if name in layer_g:
                w = model.get_parameter(name).detach().double().to(where)
                n = min(fam.n_units - 1, int(max_fraction * fam.n_units))
                _, _, curves[fam.key] = obs_select(w, layer_g[name], consumer_columns(fam, name), n, damp)
                scale[fam.key] = energy
        del layer_g                               # before the next layer's are accumulated
    curves = {f.key: curves[f.key] for f in families}
    counts = allocate(curves, scale, total)
    logger.info("OBS allocation (%s): %s", how, {k: v for k, v in counts.items()})
    return {k: list(range(n)) for k, n in counts.items()}
