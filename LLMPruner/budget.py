"""Adaptive structure: one global ranking across layers and across heads vs MLP channels.

Scores are standardised within each family (``(s - mean) / std``, FLAP's AL-AM), so that units of
different layers and kinds compare; units are then removed from the lowest standardised score up until
the parameters they remove reach the budget. Each unit costs the parameters it takes with it (a KV group
of 4 heads in a 4096-wide model: 4 x 3 x 128 x 4096 + ...; an MLP channel: 3 x 4096). A family always
keeps one unit. ``round_to`` then rounds each family's kept channel count to a multiple.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .graph import Family
from .select import channels_per_unit

logger = logging.getLogger(__name__)


def unit_cost(model: nn.Module, fam: Family) -> int:
    """Parameters removed with one unit of ``fam``."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    cost = 0
    for m in fam.members:
        shape = shapes[m.param]
        other = 1
        for d, size in enumerate(shape):
            if d != m.dim:
                other *= size
        cost += m.indices.shape[1] * other
    return cost


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the input embedding and the output head (what depth/width budgets count)."""
    skip = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        skip.add(id(out.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def choose_by_budget(model: nn.Module, families: list[Family], scores: dict[str, torch.Tensor],
                     budget: int, round_to: int = 1) -> dict[str, list[int]]:
    """``{family.key: removed units}`` removing about ``budget`` parameters (within one unit)."""
    z, owner, unit, cost = [], [], [], []
    for i, fam in enumerate(families):
        s = scores[fam.key].double()
        std = s.std() if fam.n_units > 1 else torch.tensor(1.0, dtype=torch.float64)
        z.append((s - s.mean()) / (std if std > 0 else 1.0))
        owner += [i] * fam.n_units
        unit += list(range(fam.n_units))
        cost += [unit_cost(model, fam)] * fam.n_units
    order = torch.argsort(torch.cat(z), stable=True).tolist()
    removed: dict[str, list[int]] = {f.key: [] for f in families}
    spent = 0
    for j in order:
        if spent >= budget:
            break
        fam = families[owner[j]]
        if len(removed[fam.key]) >= fam.n_units - 1 or spent + cost[j] > budget + cost[j] // 2:
            continue
        removed[fam.key].append(unit[j])
        spent += cost[j]
    if round_to > 1:
        removed = _round(families, scores, removed, round_to)
    logger.info("budget %d parameters, removing %d", budget, spent)
    return {k: sorted(v) for k, v in removed.items()}


def _round(families, scores, removed, round_to):
    """Round each family's kept channels to a multiple of ``round_to`` (nearest; never below one step)."""
    out = {}
    for fam in families:
        per_unit = channels_per_unit(fam)
        step = max(1, round_to // per_unit) if per_unit < round_to else 1
        keep = fam.n_units - len(removed[fam.key])
        target = min(fam.n_units, max(step, int(round(keep / step)) * step))
        order = torch.argsort(scores[fam.key], stable=True).tolist()
        out[fam.key] = order[: fam.n_units - target]
    return out
