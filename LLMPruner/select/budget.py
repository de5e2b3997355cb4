"""Adaptive structure: one global ranking across layers and across kinds (KV groups, query heads, MLP
channels) under a parameter budget.

Criteria (``budget_criterion``), measured against each other on SmolLM2-135M (README, bench/smollm2.py):

* ``uniform`` (default, the best measured): every family in the layer ranges loses the same fraction of
  its units (to within one unit), the lowest-scored ones; the budget sets the fraction. The reference's
  structure, at any exact parameter count.
* ``per_param``: the unit's score divided by the parameters it removes. With Taylor scores
  (``sum |W * g|``, a first-order estimate of the loss change) that is the estimated loss change per
  parameter removed; on SmolLM2 it loses to ``uniform`` (91.6 vs 81.4 WikiText-2, 40 windows).
* ``zscore``: scores standardised within each family (``(s - mean) / std``, FLAP's AL-AM), ranked
  together; on SmolLM2 it removes a KV group in nearly every layer and loses ~2x to MLP-only pruning.

Units are taken from the lowest value up while they fit in the budget (it is never exceeded; the
remainder is under one unit). Each unit costs the parameters it takes with it (a KV group of 4 heads in
a 4096-wide model: 4 x 3 x 128 x 4096 + ...; an MLP channel: 3 x 4096). A family always keeps one unit;
a layer loses either whole KV groups or query heads, never both (their parameters overlap). With
``bias_compensation`` the bias tensors that compensation adds are counted against the budget.
``round_to`` then rounds each family's kept channel count to a multiple.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn

from LLMPruner.discover import Family
from LLMPruner.select.units import channels_per_unit

logger = logging.getLogger(__name__)

BudgetCriterion = Literal["uniform", "per_param", "zscore"]
from LLMPruner.options import BUDGET_CRITERIA, parse_count  # noqa: E402,F401  (re-exported)

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


def budget_for_target(total: int, non_embedding: int, target: int, flag: str = "--target_params") -> float:
    """The ``param_budget`` (fraction of the ``non_embedding`` parameters) that takes a model of ``total``
    parameters to ``target``: the pruned model then has ``target`` parameters plus under one unit (the
    budget is never exceeded). Embeddings and the head are never pruned, so ``target`` must exceed them."""
    floor = total - non_embedding
    if not floor < target < total:
        raise ValueError(f"{flag} {target:,}: must be below the model's {total:,} parameters and above its "
                         f"{floor:,} embedding/head parameters, which are never pruned")
    return (total - target + 0.5) / non_embedding  # + 0.5: int(budget * non_embedding) is exactly total - target


def choose_by_budget(model: nn.Module, families: list[Family], scores: dict[str, torch.Tensor],
                     budget: int, round_to: int = 1, criterion: BudgetCriterion = "uniform",
                     bias_compensation: bool = False) -> dict[str, list[int]]:
    """``{family.key: removed units}`` removing at most ``budget`` parameters (within one unit)."""
    if criterion not in BUDGET_CRITERIA:
        raise ValueError(f"--budget_criterion {criterion!r}: choose one of {', '.join(BUDGET_CRITERIA)}")
    removed = _greedy(model, families, scores, budget, criterion)
    spent = sum(len(removed[f.key]) * unit_cost(model, f) for f in families)
    check_reachable(model, families, budget, spent)
    for _ in range(3 if bias_compensation else 0):  # the biases added depend on what is removed
        extra = added_bias_parameters(model, families, removed)
        removed = _greedy(model, families, scores, budget + extra, criterion)  # remove more: biases are added
    if round_to > 1:
        removed = _round(families, scores, removed, round_to)
    return {k: sorted(v) for k, v in removed.items()}


class BudgetError(ValueError):
    """A parameter budget the pruned units cannot meet; the message names the flags that limit it."""


def check_reachable(model: nn.Module, families: list[Family], budget: int, spent: int | None = None) -> None:
    """Raise ``BudgetError`` when ``budget`` parameters cannot be removed from ``families`` to within one unit
    (each family keeps at least one unit; ``spent``: what a selection removed, default all it could)."""
    costs = [unit_cost(model, f) for f in families]
    capacity = sum((f.n_units - 1) * c for f, c in zip(families, costs))
    spent = capacity if spent is None else spent
    if budget - spent < max(costs, default=1):
        return
    kinds = sorted({f.kind for f in families})
    layers = sorted({f.layer for f in families if f.layer is not None})
    limits = ["the layer ranges (--block_attention_layer_start/_end, --block_mlp_layer_start/_end)"]
    if "attention" not in kinds:
        limits.append("--skip_attention (or an empty attention range)")
    raise BudgetError(
        f"--param_budget / --target_params: asks to remove {budget:,} parameters, but the units it may prune "
        f"({', '.join(kinds) or 'none'} of layers {layers[0] if layers else '-'}..{layers[-1] if layers else '-'}, "
        f"every family keeping at least one unit) give only {spent:,}; widen {' or drop '.join(limits)}, "
        "or ask for less")


def _greedy(model, families, scores, budget, criterion) -> dict[str, list[int]]:
    if criterion == "uniform":
        return _uniform(model, families, scores, budget)
    value, owner, unit, cost = [], [], [], []
    for i, fam in enumerate(families):
        s = scores[fam.key].double()
        c = unit_cost(model, fam)
        if criterion == "zscore":
            std = s.std() if fam.n_units > 1 else torch.tensor(1.0, dtype=torch.float64)
            value.append((s - s.mean()) / (std if std > 0 else 1.0))
        else:
            value.append(s / c)
        owner += [i] * fam.n_units
        unit += list(range(fam.n_units))
        cost += [c] * fam.n_units
    order = torch.argsort(torch.cat(value), stable=True).tolist()
    removed: dict[str, list[int]] = {f.key: [] for f in families}
    rival = _rivals(families)
    spent = 0
    for j in order:
        fam = families[owner[j]]
        if len(removed[fam.key]) >= fam.n_units - 1 or spent + cost[j] > budget:
            continue
        if any(removed[r] for r in rival.get(fam.key, ())):
            continue
        removed[fam.key].append(unit[j])
        spent += cost[j]
    logger.info("budget %d parameters, removing %d (%s)", budget, spent, criterion)
    return removed


def _uniform(model, families, scores, budget) -> dict[str, list[int]]:
    """Take one unit at a time from the family that has lost the smallest fraction so far (that fits)."""
    cost = {f.key: unit_cost(model, f) for f in families}
    order = {f.key: torch.argsort(scores[f.key], stable=True).tolist() for f in families}
    taken = {f.key: 0 for f in families}
    rival = _rivals(families)
    spent = 0
    while True:
        open_ = [f for f in families if taken[f.key] < f.n_units - 1 and spent + cost[f.key] <= budget
                 and not any(taken[r] for r in rival.get(f.key, ()))]
        if not open_:
            break
        f = min(open_, key=lambda f: ((taken[f.key] + 1) / f.n_units, f.layer or 0))
        taken[f.key] += 1
        spent += cost[f.key]
    logger.info("budget %d parameters, removing %d (uniform)", budget, spent)
    return {k: order[k][:n] for k, n in taken.items()}


def _rivals(families: list[Family]) -> dict[str, list[str]]:
    """Families of the same layer whose parameters overlap (KV groups and query heads)."""
    by_layer: dict[int | None, list[Family]] = {}
    for f in families:
        by_layer.setdefault(f.layer, []).append(f)
    out: dict[str, list[str]] = {}
    for fams in by_layer.values():
        for a in fams:
            slots_a = {(m.param, m.dim) for m in a.members}
            out[a.key] = [b.key for b in fams if b is not a and slots_a & {(m.param, m.dim) for m in b.members}]
    return out


def added_bias_parameters(model: nn.Module, families: list[Family], removed: dict[str, list[int]]) -> int:
    """Parameters of the bias tensors ``--compensation bias`` would add for ``removed``: the adapter
    switches biases on for every projection of each compensated kind (zero where nothing was removed)."""
    from LLMPruner.adapters import get_adapter
    from LLMPruner.select.units import make_plan
    adapter = get_adapter(model)
    plan = make_plan(model, families, removed)
    kinds = {adapter.kind_of(p) for p, dims in plan.keep.items() if 1 in dims}
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None and adapter.kind_of(name + ".weight") in kinds:
            rows = plan.keep.get(name + ".weight", {}).get(0)
            total += len(rows) if rows is not None else module.weight.shape[0]
    return total


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
