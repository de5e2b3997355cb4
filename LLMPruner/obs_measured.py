"""Per-layer unit counts from *measured* damage: ``--obs_allocation kl``.

The other allocations (``obs_allocation.py``) compare layers by a proxy (the OBS reconstruction error
scaled by the residual stream, by the consumer's output, or Fisher-weighted). This one measures what the
proxies estimate. For each family (the MLP of one layer) and each level ``c`` of ``LEVELS`` x its units
(up to ``max_fraction``), greedy structured OBS on the dense model's inputs removes ``c`` units from that
layer alone, with the optimal update of the kept columns (``W H[:, K] H_KK^-1``, ``H`` damped as in
OBS); the rest of the model stays dense, and the damage is the mean KL divergence of the model's
next-token distribution from the dense one, on the first ``eval_windows`` calibration windows. Between
levels the curve is interpolated linearly, then replaced by its lower convex hull (so the marginal cost
of a unit never falls), and the removals go where the marginal KL is smallest (``allocate``: the same
greedy as the proxies', on exact per-unit marginals).

Cost: one forward of the layers after the pruned one (on ``eval_windows`` windows) per level and layer,
e.g. 24 layers x 6 levels of SmolLM2 on 16 x 128 tokens: about 10 minutes on one CPU thread. The
per-layer damages are assumed additive (the sequential pass that follows then prunes on the pruned
model's own inputs).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .activations import consumers
from .adapters import get_adapter
from .graph import Family
from .obs import DAMP, consumer_columns, damped, obs_select
from .obs_allocation import consumer_names, layer_grams
from .stream.states import Feed, capture, swapped

logger = logging.getLogger(__name__)

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
EVAL_WINDOWS = 16


def refit_kept(w: torch.Tensor, gram: torch.Tensor, removed_cols: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``w`` (``[out, in]``) with ``removed_cols`` zeroed and the other columns ``K`` set to the damped
    least squares ``W H[:, K] H_KK^-1`` (``H = gram + lam I``): what greedy OBS leaves after removing them."""
    w = w.detach().double()
    h, _ = damped(gram, damp)
    keep = torch.ones(h.shape[0], dtype=torch.bool)
    keep[removed_cols] = False
    out = torch.zeros_like(w)
    hk = h[keep][:, keep]
    out[:, keep] = torch.linalg.solve(hk, (w @ h[:, keep]).T).T
    return out


def hull_marginals(points: list[tuple[int, float]], n: int) -> list[float]:
    """Per-unit marginal costs (``n`` of them) of the lower convex hull of ``points`` (``(count, cost)``,
    starting at ``(0, 0)``, counts increasing, the last one ``n``): non-decreasing."""
    hull: list[tuple[int, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):   # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    out: list[float] = []
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        out += [(y2 - y1) / (x2 - x1)] * (x2 - x1)
    assert len(out) == n, (len(out), n)
    return out


@torch.no_grad()
def _logprobs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, last: torch.Tensor,
              as_tuple: bool) -> torch.Tensor:
    with swapped(layers, lambda like: Feed(like, last, as_tuple)):
        logits = model(input_ids=ids.to(last.device), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def measured_curves(model: nn.Module, families: list[Family], examples: torch.Tensor, damp: float = DAMP,
                    batch_size: int = 8, max_fraction: float = 0.6, eval_windows: int = EVAL_WINDOWS,
                    levels: tuple[float, ...] = LEVELS) -> dict[str, list[float]]:
    """``{family: per-unit marginal KL}`` (``int(max_fraction * units)`` entries, non-decreasing): the
    measured damage of pruning that family alone, one level at a time (module docstring)."""
    layers = get_adapter(model).decoder_layers(model)
    windows = examples[:eval_windows]
    batches = []  # (ids, layer call, inputs of every layer, dense log-probs)
    for s in range(0, len(windows), batch_size):
        ids = windows[s:s + batch_size]
        x, call = capture(model, layers, ids)
        states = [x]
        for layer in layers:
            states.append(call(layer, states[-1]))
        batches.append((ids, call, states, _logprobs(model, layers, ids, states[-1], call.as_tuple)))
    cons = consumers(model, families)
    consumer_of = consumer_names(families, cons)
    params = dict(model.named_parameters())
    curves: dict[str, list[float]] = {}
    progress = tqdm(total=len(families), desc="measured allocation", leave=False)
    for _, grams, _ in layer_grams(model, cons, examples, batch_size):  # one layer's Grams at a time
        for fam in (f for f in families if consumer_of[f.key] in grams):
            name = consumer_of[fam.key]
            curves[fam.key] = _curve(fam, params[name], grams[name], cols=consumer_columns(fam, name),
                                     damp=damp, max_fraction=max_fraction, levels=levels,
                                     kl=lambda: _kl(layers, fam.layer, batches, model))
            progress.update()
        del grams
    progress.close()
    return {f.key: curves[f.key] for f in families}


def _curve(fam: Family, p: nn.Parameter, gram: torch.Tensor, cols: torch.Tensor, damp: float,
           max_fraction: float, levels: tuple[float, ...], kl) -> list[float]:
    """One family's per-unit marginal KL: its consumer ``p`` refitted at each level, ``kl()`` measured."""
    n_max = min(fam.n_units - 1, int(max_fraction * fam.n_units))
    order, _, _ = obs_select(p.detach().cpu(), gram, cols, n_max, damp)
    counts = sorted({min(n_max, max(1, round(f * fam.n_units))) for f in levels} | {n_max})
    points = [(0, 0.0)]
    saved = p.data
    try:
        for c in counts:
            removed_cols = cols[torch.as_tensor(order[:c])].flatten()
            p.data = refit_kept(saved.cpu(), gram, removed_cols, damp).to(saved)
            points.append((c, kl()))
    finally:
        p.data = saved
    logger.info("%s: measured KL %s", fam.key, ", ".join(f"{c}: {v:.4g}" for c, v in points[1:]))
    return hull_marginals(points, n_max)


def _kl(layers: nn.ModuleList, first: int, batches, model: nn.Module) -> float:
    """Mean KL(dense || model) per token, the model differing from the dense one from layer ``first`` on."""
    total, tokens = 0.0, 0
    for ids, call, states, dense in batches:
        h = states[first]
        for layer in list(layers)[first:]:
            h = call(layer, h)
        logp = _logprobs(model, layers, ids, h, call.as_tuple)
        total += float((dense.exp() * (dense - logp)).sum())
        tokens += ids.numel()
    return total / tokens
