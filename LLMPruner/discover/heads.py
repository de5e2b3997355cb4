"""Query heads inside KV groups: a finer attention unit for GQA models with few KV groups.

Discovery's attention unit is a KV group (its ``k``/``v`` rows and all its query heads' ``q`` rows and
``o`` columns). With 3 KV groups (SmolLM2-135M) removing one is a third of the attention. Here a layer's
attention family also yields a *query-head* family whose unit ``r`` is "the ``r``-th least important
query head of every KV group": removing ``m`` such units removes ``m`` query heads from each group, so
the layer stays a valid GQA layer (``heads = kv * (G - m)``) and ``k``/``v`` are untouched.

Worked example (SmolLM2: 3 KV groups, G = 3 query heads each, head_dim 64): the attention family's
``q_proj`` member has ``[3, 192]`` indices (3 heads x 64 rows per group) and ``k_proj`` ``[3, 64]``.
``head_family`` splits the query-side members into ``[9, 64]`` (one unit per query head) for scoring;
``rank_family`` then builds ``[3, 192]`` units: unit 0 = rows of the weakest head of groups 0, 1, 2.
The module knows no module names: query-side members are those ``G`` times wider than the narrowest one.
"""
from __future__ import annotations

import torch

from LLMPruner.discover import Family, Member


def heads_per_group(att: Family) -> int:
    """``G``: query heads per KV group (1 for multi-head attention)."""
    widths = [m.indices.shape[1] for m in att.members]
    k = min(widths)
    return max(widths) // k


def head_family(att: Family) -> Family | None:
    """One unit per query head (``n_kv * G`` units) of the query-side members, or None if ``G == 1``."""
    g = heads_per_group(att)
    if g == 1:
        return None
    k = min(m.indices.shape[1] for m in att.members)
    members = [Member(m.param, m.dim, m.indices.reshape(att.n_units * g, k))
               for m in att.members if m.indices.shape[1] == g * k]
    return Family(kind="qhead_single", layer=att.layer, members=members)


def rank_family(att: Family, single: Family, head_scores: torch.Tensor) -> tuple[Family, torch.Tensor]:
    """The query-head family (unit ``r`` = the ``r``-th weakest head of every group) and its scores
    (the sum over groups of those heads' scores). ``head_scores``: ``[n_kv * G]`` from ``single``."""
    g = heads_per_group(att)
    n_kv = att.n_units
    per_group = head_scores.reshape(n_kv, g)
    order = torch.argsort(per_group, dim=1, stable=True)                  # [n_kv, G] head ranks
    heads = order + torch.arange(n_kv)[:, None] * g                       # global head index
    members = []
    for m in single.members:                                              # m.indices: [n_kv * G, k]
        members.append(Member(m.param, m.dim, m.indices[heads.T].reshape(g, -1).sort(1).values))
    scores = torch.gather(per_group, 1, order).sum(0)                     # [G]
    return Family(kind="qheads", layer=att.layer, members=members), scores
