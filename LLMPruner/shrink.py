"""Shrink: apply a pruning plan by physically slicing the weights (no masks).

The result is the same stock transformers model, smaller: module size attributes and the config are
rewritten from the new weight shapes (the adapter knows which config fields).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from LLMPruner.adapters import get_adapter
from LLMPruner.plan import PruningPlan
from LLMPruner.structure import ModelStructure

logger = logging.getLogger(__name__)


def apply_plan(model: nn.Module, plan: PruningPlan) -> ModelStructure:
    """Slice ``model`` in place according to ``plan``; returns the new per-layer structure."""
    adapter = get_adapter(model)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        mod_name, _, attr = full.rpartition(".")
        owners.setdefault(id(p), []).append((model.get_submodule(mod_name), attr))
    params = dict(model.named_parameters())
    unknown = sorted(set(plan.keep) - set(params))
    if unknown:
        raise KeyError(f"the plan names parameters this model does not have: {unknown[:5]}")
    for name, dims in plan.keep.items():
        p = params[name]
        data = p.data
        for dim, keep in sorted(dims.items()):
            data = data.index_select(dim, torch.as_tensor(keep, device=data.device))
        new = nn.Parameter(data.contiguous(), requires_grad=p.requires_grad)
        for module, attr in owners[id(p)]:
            setattr(module, attr, new)
    sync_module_sizes(model)
    if plan.keep_layers is not None:
        adapter.keep_decoder_layers(model, plan.keep_layers)
    return adapter.update_config(model)


def sync_module_sizes(model: nn.Module) -> None:
    """Make generic modules' size attributes agree with their weights (Linear, Embedding, LayerNorm)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif hasattr(m, "hidden_size") and getattr(m, "weight", None) is not None and m.weight.ndim == 1:
            m.hidden_size = m.weight.shape[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
