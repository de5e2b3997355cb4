"""Selection: from unit scores to a pruning plan.

Per layer (default) every target family keeps ``int(n * (1 - ratio))`` of its ``n`` units; with
``global_pruning`` the units of each kind (attention, mlp, hidden) are ranked together across layers.
Never the last unit of a family. ``round_to`` rounds each family's kept channel count to a multiple.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .graph import Family
from .plan import PruningPlan

logger = logging.getLogger(__name__)


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
           original_units: dict[str, int] | None = None) -> dict[str, list[int]]:
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
            keep = min(fam.n_units, kept_count(n0, ratio, round_to, channels_per_unit(fam)))
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
    """Turn removed units into kept indices per ``(parameter, dim)``."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    plan = PruningPlan(removed_units={k: v for k, v in removed.items()})
    for fam in families:
        units = removed.get(fam.key, [])
        if not units:
            continue
        for m in fam.members:
            gone = set(m.indices[units].reshape(-1).tolist())
            keep = [i for i in range(shapes[m.param][m.dim]) if i not in gone]
            assert keep, f"{m.param} dim {m.dim} would lose every index"
            plan.keep.setdefault(m.param, {})[m.dim] = keep
    return plan
