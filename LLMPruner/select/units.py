"""Selection: from unit scores to a pruning plan.

Per layer (default) every target family loses what the reference's pruner removes (``rounding="reference"``,
torch_pruning's MetaPruner): counted in the channels of the family's narrowest member (a KV group's
``k_proj`` rows, ``head_dim`` of them; one MLP channel), ``n_pruned = C - int(C * (1 - ratio))`` channels
of ``C = n * k``, then ``n_pruned // k`` whole units. Worked examples: 3 KV groups of 64 at 0.25 ->
192 - int(144.0) = 48 channels -> 0 groups; at 0.5 -> 96 -> 1 group; MLP 1536 at 0.25 -> 384 channels.
``rounding="nearest"`` removes ``round(ratio * n)`` units instead (3 groups at 0.25 -> 1).
With ``global_pruning`` the units of each kind (attention, mlp, hidden) are ranked together across layers.
Never the last unit of a family. ``round_to`` rounds each family's kept channel count to a multiple.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn

from LLMPruner.discover import Family
from LLMPruner.plan import PruningPlan

logger = logging.getLogger(__name__)

Rounding = Literal["reference", "nearest"]
from LLMPruner.options import ROUNDINGS  # noqa: E402,F401  (re-exported)


def removed_count(n_now: int, n0: int, ratio: float, channels_per_unit: int = 1,
                  rounding: Rounding = "reference") -> int:
    """Units to remove now from a family of ``n_now`` units (``n0`` before any pruning step) so that
    ``ratio`` of ``n0`` is gone, rounded as the reference does (or to nearest). Never the last unit."""
    if rounding == "reference":
        k = channels_per_unit
        gone_channels = n_now * k - int(n0 * k * (1.0 - ratio))  # torch_pruning: current - int(init * (1 - r))
        units = max(0, gone_channels // k)
    elif rounding == "nearest":
        units = max(0, n_now - (n0 - int(round(ratio * n0))))
    else:
        raise ValueError(f"--unit_rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    return min(units, n_now - 1)


def narrowest(fam: Family) -> int:
    """Channels per unit in the family's narrowest member (the reference's root for heads: ``k_proj``)."""
    return min(m.indices.shape[1] for m in fam.members)


def channels_per_unit(family: Family) -> int:
    """Channels one unit spans where widths are counted (``--round_to``): the consumer's input columns,
    e.g. o_proj's columns per KV group, down_proj's per MLP channel. Not the first member's rows: BLOOM's
    first attention member is the one ALiBi slope per head, GLM/Phi-3's fused gate_up has two rows."""
    for member in family.members:
        if member.dim == 1:
            return member.indices.shape[1]
    return family.members[0].indices.shape[1]


def kept_count(n: int, ratio: float, round_to: int = 1, channels_per_unit: int = 1) -> int:
    keep = max(1, int(n * (1.0 - ratio) + 1e-9))
    if round_to > 1 and channels_per_unit < round_to:
        step = max(1, round_to // channels_per_unit)
        keep = max(step, int(round(keep / step)) * step)
    return min(keep, n)


def choose(families: list[Family], scores: dict[str, torch.Tensor], ratio: float,
           global_pruning: bool = False, round_to: int = 1,
           original_units: dict[str, int] | None = None,
           rounding: Rounding = "reference") -> dict[str, list[int]]:
    """``{family.key: removed unit indices}`` (lowest scores removed).

    ``ratio`` is the fraction of ``original_units`` (default: the current counts) to be gone after this
    call, so iterative pruning passes a growing ratio with the counts it started from.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--pruning_ratio {ratio}: must be in [0, 1)")
    original = original_units or {}
    removed: dict[str, list[int]] = {}
    if not global_pruning:
        for fam in families:
            n0 = original.get(fam.key, fam.n_units)
            keep = fam.n_units - removed_count(fam.n_units, n0, ratio, narrowest(fam), rounding)
            if round_to > 1:
                keep = min(fam.n_units, kept_count(keep, 0.0, round_to, channels_per_unit(fam)))
            order = torch.argsort(scores[fam.key], stable=True)
            removed[fam.key] = sorted(order[: fam.n_units - keep].tolist())
        return removed
    for kind in sorted({f.kind for f in families}):
        fams = [f for f in families if f.kind == kind]
        total = sum(f.n_units for f in fams)
        total0 = sum(original.get(f.key, f.n_units) for f in fams)
        to_remove = max(0, total - max(len(fams), int(total0 * (1.0 - ratio) + 1e-9)))
        flat = torch.cat([scores[f.key] for f in fams])
        owner = torch.cat([torch.full((f.n_units,), i) for i, f in enumerate(fams)])
        unit = torch.cat([torch.arange(f.n_units) for f in fams])
        picked = {f.key: [] for f in fams}
        for j in torch.argsort(flat, stable=True).tolist():
            if to_remove == 0:
                break
            fam = fams[owner[j]]
            if len(picked[fam.key]) < fam.n_units - 1:
                picked[fam.key].append(int(unit[j]))
                to_remove -= 1
        removed.update({k: sorted(v) for k, v in picked.items()})
    return removed


def make_plan(model: nn.Module, families: list[Family], removed: dict[str, list[int]]) -> PruningPlan:
    """Turn removed units into kept indices per ``(parameter, dim)``. Families may overlap (a KV group
    and the query-head family of the same layer both hold ``q_proj`` rows): the removed sets unite."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    plan = PruningPlan(removed_units={k: v for k, v in removed.items()})
    gone: dict[tuple[str, int], set[int]] = {}
    for fam in families:
        units = removed.get(fam.key, [])
        if not units:
            continue
        for m in fam.members:
            gone.setdefault((m.param, m.dim), set()).update(m.indices[units].reshape(-1).tolist())
    for (param, dim), out in gone.items():
        keep = [i for i in range(shapes[param][dim]) if i not in out]
        assert keep, f"{param} dim {dim} would lose every index"
        plan.keep.setdefault(param, {})[dim] = keep
    return plan
