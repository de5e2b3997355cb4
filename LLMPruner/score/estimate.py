"""Estimation: an importance score for every unit of every family.

Element saliences (``W`` weight, ``g`` gradient of the calibration loss, ``F`` diagonal empirical Fisher =
mean of per-example squared gradients):

=============  ==========================  ======================================
pruner/taylor  per channel (sum over the other dims)  worked example, W=[1,-2], g=[3,1]
=============  ==========================  ======================================
l1             sum |W|                      3
l2             sum W^2                      5
vectorize      |sum W*g|                    |3 - 2| = 1
param_first    sum |W*g|                    3 + 2 = 5
param_second   sum |1/2 W*F*W|              1/2 (1*F1 + 4*F2)
param_mix      sum |W*g - 1/2 W*F*W|
=============  ==========================  ======================================

A unit (a head group, an MLP channel) sums the scores of its channels in each member parameter; the
members are then combined with ``grouping`` (sum, mean, max, prod, or the last member).

Gradients are turned into channel scores *as they arrive* (a post-accumulate-grad hook per parameter) and
freed at once, so no gradient copy of the whole model is ever held; only parameters of the families
being scored take gradients at all.
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from LLMPruner.discover import Family
from LLMPruner.options import GROUPINGS, PRUNER_TYPES, TAYLOR_MODES  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

PrunerType = Literal["random", "l1", "l2", "taylor"]
TaylorMode = Literal["vectorize", "param_first", "param_second", "param_mix"]
Grouping = Literal["sum", "mean", "max", "prod", "last"]

Slot = tuple[str, int]  # (parameter name, dim)
#: Taylor's gradient of the mean calibration loss is taken over chunks of this many samples (the logits of
#: 128 x 128 tokens of a 49k vocabulary would be 3 GB at once); with more samples than this, the gradients
#: of the scored parameters are held until the last chunk.
GRAD_CHUNK = 16


def channel_reduce(salience: torch.Tensor, dim: int, abs_first: bool = True) -> torch.Tensor:
    """Per-index totals along ``dim``: ``sum |s|`` over the other dims (or ``|sum s|``)."""
    other = [d for d in range(salience.ndim) if d != dim]
    if abs_first:
        return salience.abs().sum(dim=other) if other else salience.abs()
    return (salience.sum(dim=other) if other else salience).abs()


def slots_of(families: list[Family]) -> dict[str, list[int]]:
    needed: dict[str, list[int]] = {}
    for fam in families:
        for m in fam.members:
            needed.setdefault(m.param, [])
            if m.dim not in needed[m.param]:
                needed[m.param].append(m.dim)
    return needed


def magnitude_scores(model: nn.Module, families: list[Family], p: int) -> dict[Slot, torch.Tensor]:
    params = dict(model.named_parameters())
    return {(n, d): channel_reduce(params[n].detach().float().abs().pow(p), d)
            for n, dims in slots_of(families).items() for d in dims}


class TaylorAccumulator:
    """Turns each parameter's gradient into channel scores the moment it is complete.

    ``add(name, w, g)`` in phase ``"fisher"`` takes one example's gradient (of that example's mean loss),
    in phase ``"grad"`` the gradient of the calibration batch's mean loss; ``param_mix`` needs every
    fisher contribution of a parameter before its batch gradient. Shared by the in-memory path (post-
    accumulate-grad hooks) and the layer-streamed one (``LLMPruner.stream.taylor``).
    """

    def __init__(self, needed: dict[str, list[int]], mode: TaylorMode, n_examples: int) -> None:
        self.needed, self.mode, self.n = needed, mode, n_examples
        self.phase = "grad"
        self.scores: dict[Slot, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}

    def add(self, name: str, w: torch.Tensor, g: torch.Tensor) -> None:
        w, g, n, mode = w.detach().float(), g.detach().float(), self.n, self.mode
        if self.phase == "fisher":
            if mode == "param_second":  # linear in g^2: accumulate reductions, never the Fisher itself
                for d in self.needed[name]:
                    add = channel_reduce(0.5 * w * w * g * g / n, d)
                    self.scores[(name, d)] = self.scores.get((name, d), 0) + add
            else:
                self.fisher[name] = self.fisher.get(name, 0) + g * g / n
            return
        if mode == "vectorize":
            for d in self.needed[name]:
                self.scores[(name, d)] = channel_reduce(w * g, d, abs_first=False)
        elif mode == "param_first":
            for d in self.needed[name]:
                self.scores[(name, d)] = channel_reduce(w * g, d)
        elif mode == "param_mix":
            sal = w * g - 0.5 * w * self.fisher.pop(name) * w
            for d in self.needed[name]:
                self.scores[(name, d)] = channel_reduce(sal, d)

    def result(self) -> dict[Slot, torch.Tensor]:
        missing = [(n, d) for n, dims in self.needed.items() for d in dims if (n, d) not in self.scores]
        assert not missing, f"no gradient reached {missing[:3]}"
        return self.scores


def taylor_scores(model: nn.Module, families: list[Family], examples: torch.Tensor,
                  mode: TaylorMode) -> dict[Slot, torch.Tensor]:
    """Channel scores from gradients of the language-model loss on ``examples`` ``[N, T]``."""
    params = dict(model.named_parameters())
    needed = slots_of(families)
    n = examples.shape[0]
    acc = TaylorAccumulator(needed, mode, n)

    def on_grad(name: str, p: torch.Tensor) -> None:
        if acc.phase == "accumulate":
            return  # keep the gradient: more chunks follow
        g = p.grad
        p.grad = None  # free the gradient right away: scores are all we keep
        acc.add(name, p, g)

    saved = {n: p.requires_grad for n, p in params.items()}
    handles = []
    try:
        for name, p in params.items():
            p.requires_grad_(name in needed)
            if name in needed:
                handles.append(p.register_post_accumulate_grad_hook(lambda p, name=name: on_grad(name, p)))
        if mode in ("param_second", "param_mix"):
            acc.phase = "fisher"
            for i in tqdm(range(n), desc="fisher (per-example gradients)", leave=False):
                _backward(model, examples[i:i + 1], f"example {i}")
        if mode != "param_second":  # chunks of GRAD_CHUNK samples: gradients add up, scores at the last
            chunks = list(range(0, n, GRAD_CHUNK))
            for c in chunks:
                acc.phase = "grad" if c == chunks[-1] else "accumulate"
                _backward(model, examples[c:c + GRAD_CHUNK], "calibration batch", len(examples[c:c + GRAD_CHUNK]) / n)
    finally:
        for h in handles:
            h.remove()
        for name, p in params.items():
            p.requires_grad_(saved[name])
            p.grad = None
    return acc.result()


def _backward(model: nn.Module, batch: torch.Tensor, what: str, weight: float = 1.0) -> None:
    batch = batch.to(next(model.parameters()).device)
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    if not math.isfinite(loss.item()):
        raise FloatingPointError(
            f"calibration loss is {loss.item()} on the {what}; the model's dtype "
            f"({next(model.parameters()).dtype}) may overflow: try --dtype float32 or bfloat16")
    (loss * weight).backward()


def unit_scores(families: list[Family], channel: dict[Slot, torch.Tensor] | None,
                grouping: Grouping = "sum", seed: int = 0) -> dict[str, torch.Tensor]:
    """``{family.key: [n_units] scores}``; ``channel=None`` means random scores."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for fam in families:
        if channel is None:
            out[fam.key] = torch.rand(fam.n_units, generator=gen)
            continue
        scored = [m for m in fam.members if (m.param, m.dim) in channel]
        assert scored, f"no member of {fam.key} has channel scores"
        per_member = torch.stack([channel[(m.param, m.dim)].cpu()[m.indices].sum(1) for m in scored])
        out[fam.key] = _combine(per_member, grouping)
    return out


def _combine(per_member: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    if grouping == "sum":
        return per_member.sum(0)
    if grouping == "mean":
        return per_member.mean(0)
    if grouping == "max":
        return per_member.max(0).values
    if grouping == "prod":
        return per_member.prod(0)
    if grouping == "last":
        return per_member[-1]
    raise ValueError(f"--grouping_strategy {grouping!r}: choose one of {', '.join(GROUPINGS)}")


def estimate(model: nn.Module, families: list[Family], *, pruner_type: PrunerType = "taylor",
             taylor: TaylorMode = "param_first", grouping: Grouping = "sum",
             examples: torch.Tensor | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Importance of every unit of ``families`` (higher = more important)."""
    if pruner_type == "random":
        return unit_scores(families, None, grouping, seed)
    if pruner_type in ("l1", "l2"):
        return unit_scores(families, magnitude_scores(model, families, 1 if pruner_type == "l1" else 2), grouping)
    if pruner_type == "taylor":
        if taylor not in TAYLOR_MODES:
            raise ValueError(f"--taylor {taylor!r}: choose one of {', '.join(TAYLOR_MODES)}")
        if examples is None:
            raise ValueError("taylor importance needs calibration examples")
        return unit_scores(families, taylor_scores(model, families, examples, taylor), grouping)
    raise ValueError(f"--pruner_type {pruner_type!r}: choose one of {', '.join(PRUNER_TYPES)}")
