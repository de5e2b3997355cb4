"""Expert pruning for mixture-of-experts decoders: remove whole experts from every MoE layer.

The method in the package's order: **discover** the MoE blocks (``moe_layers``: a layer's ``mlp`` holding
an ``experts`` module of 3-D parameters ``[E, ...]`` and a router, ``gate`` or ``router``, whose weight is
``[E, hidden]``), **score** each expert on calibration tokens (``expert_scores``), **select** the same
number of the lowest-scored experts in every MoE layer (``choose_experts``: a stock config holds one
expert count), **shrink** (``remove_experts``: the experts' parameters and the router's rows sliced, the
config's expert count updated). The result is a stock checkpoint of the same type with fewer experts.

Importances (``--expert_importance``):

* ``reap`` — REAP (Lasby et al., 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE
  Compression"): the mean, over the tokens routed to expert ``e``, of ``g_e(x) * ||f_e(x)||_2``, its router
  weight times the norm of its output. An expert that is rarely chosen, or chosen with a small weight, or
  whose output is small, contributes least to the layer's output.
* ``frequency`` — how many calibration tokens choose the expert among their top-k.
* ``random`` — a baseline.

Routers that renormalise the top-k weights (Mixtral, GPT-OSS, Qwen-MoE with ``norm_topk_prob``) give
exactly the same outputs on tokens that chose none of the removed experts; a token that did is routed to
its next choice. Routers without renormalisation (OLMoE, Qwen-MoE's default) also lose the removed experts'
share of the softmax, so every token's expert weights grow a little.
"""
from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from LLMPruner.plan import PruningPlan

logger = logging.getLogger(__name__)

ExpertImportance = Literal["reap", "frequency", "random"]
from LLMPruner.options import EXPERT_IMPORTANCES  # noqa: E402,F401  (re-exported)
#: config (and module) attributes holding the expert count, in the order they are looked for
COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class ExpertPruningError(ValueError):
    """A request expert pruning cannot satisfy; the message names the flag and what is allowed."""


@dataclass(frozen=True)
class MoELayer:
    index: int            # decoder layer
    block: nn.Module      # the layer's sparse MLP
    experts: nn.Module    # 3-D parameters [E, ...]
    router: nn.Module     # holds the [E, hidden] weight (GPT-OSS: and a bias; Hunyuan: in ``router.wg``)
    num_experts: int

    def top_k(self, config) -> int:
        k = getattr(self.router, "top_k", None) or getattr(config, "num_experts_per_tok", None) or 1
        return int(k)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The decoder layers whose MLP is a sparse mixture of experts (dense layers in between are skipped)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return []
    found = []
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        router = getattr(block, "router", None) or getattr(block, "gate", None)
        if experts is None or not isinstance(router, nn.Module):
            continue
        weights = [p for p in router.parameters() if p.dim() == 2]
        if len(weights) != 1:
            continue
        n = weights[0].shape[0]
        params = list(experts.named_parameters(recurse=False))
        if not params or any(p.dim() < 2 or p.shape[0] != n for _, p in params):
            continue  # not the fused [E, ...] layout of transformers 5
        found.append(MoELayer(i, block, experts, router, n))
    return found


def set_expert_count(config: dict, n_new: int, source: str) -> None:
    """Write ``n_new`` into every expert-count entry of a config's ``dict`` (a per-layer list stays a list)."""
    keys = [k for k in COUNT_KEYS if isinstance(config.get(k), (int, list))]
    if not keys:
        raise ExpertPruningError(f"{source}: no {' / '.join(COUNT_KEYS)} in the config, so the expert count "
                                 "cannot be written back")
    for key in keys:
        config[key] = [n_new] * len(config[key]) if isinstance(config[key], list) else n_new


def check_expert_count(model: nn.Module, n_remove: int) -> list[MoELayer]:
    """The MoE layers, after checking that ``--prune_experts n_remove`` leaves at least top-k experts."""
    layers = moe_layers(model)
    model_type = getattr(model.config, "model_type", None)
    if not layers:
        raise ExpertPruningError(f"--prune_experts {n_remove}: model_type {model_type!r} has no mixture-of-experts "
                                 "layers (a layer's mlp with fused 3-D experts and a router); prune dense models "
                                 "with --block_wise / --channel_wise / --prune_layers")
    counts = {moe.num_experts for moe in layers}
    if len(counts) != 1:
        raise ExpertPruningError(f"--prune_experts: the MoE layers hold different expert counts {sorted(counts)}")
    n = counts.pop()
    top_k = max(moe.top_k(model.config) for moe in layers)
    if not isinstance(n_remove, int) or not 1 <= n_remove <= n - top_k:
        raise ExpertPruningError(f"--prune_experts {n_remove}: must be between 1 and {n - top_k} (each MoE layer "
                                 f"has {n} experts and every token is routed to {top_k})")
    groups = expert_groups(model.config)
    if groups > 1:
        per_group = (n - n_remove) // groups
        if n_remove % groups or per_group < 2 or per_group * _topk_group(model.config) < top_k:
            raise ExpertPruningError(
                f"--prune_experts {n_remove}: the router scores {groups} groups of {n // groups} experts (n_group) and "
                f"routes within the best {_topk_group(model.config)} (topk_group): remove a multiple of {groups}, "
                f"leaving every group at least 2 experts and enough for top-{top_k}")
    return layers


def expert_groups(config) -> int:
    """DeepSeek-V3-style group-limited routing (``n_group`` contiguous groups of experts; 1 otherwise)."""
    return int(getattr(config, "n_group", None) or 1)


def _topk_group(config) -> int:
    return int(getattr(config, "topk_group", None) or 1)


class _Recorder:
    """Forward pre-hooks on every ``experts`` module: what the router chose, and (for ``reap``) the norm of
    each chosen expert's output, recomputed by the module itself on the tokens routed to it."""

    def __init__(self, layers: list[MoELayer], reap: bool):
        self.layers, self.reap = layers, reap
        self.counts = {m.index: torch.zeros(m.num_experts, dtype=torch.float64) for m in layers}
        self.weighted = {m.index: torch.zeros(m.num_experts, dtype=torch.float64) for m in layers}
        self._inside = threading.local()
        self._handles = []

    def __enter__(self) -> "_Recorder":
        for moe in self.layers:
            self._handles.append(moe.experts.register_forward_pre_hook(self._hook(moe), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, moe: MoELayer):
        def fn(module, args, kwargs):
            if getattr(self._inside, "on", False):
                return None  # the recomputation below calls the module again
            values = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments.values())
            if len(values) < 3:
                raise ExpertPruningError(f"layer {moe.index}: {type(module).__name__}'s forward does not take "
                                         "(hidden_states, top_k_index, top_k_weights); this MoE layout is not "
                                         "supported")
            x, index, weight = values[0], values[1], values[2]
            with torch.no_grad():
                self._record(moe, module, x, index, weight)
            return None
        return fn

    def _record(self, moe: MoELayer, module: nn.Module, x: torch.Tensor, index: torch.Tensor,
                weight: torch.Tensor) -> None:
        n = moe.num_experts
        flat = index.reshape(-1)
        valid = (flat >= 0) & (flat < n)
        self.counts[moe.index] += torch.bincount(flat[valid].cpu(), minlength=n).double()
        if not self.reap:
            return
        tokens = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index).reshape(-1)
        w = weight.reshape(-1)
        self._inside.on = True
        try:
            for e in torch.unique(flat[valid]).tolist():
                sel = flat == e
                xs = x[tokens[sel]]
                one = torch.full((xs.shape[0], 1), e, dtype=index.dtype, device=index.device)
                out = module(xs, one, torch.ones((xs.shape[0], 1), dtype=weight.dtype, device=weight.device))
                norms = out.double().norm(dim=-1)
                self.weighted[moe.index][e] += (w[sel].double() * norms).sum().cpu()
        finally:
            self._inside.on = False


@torch.no_grad()
def expert_scores(model: nn.Module, examples: torch.Tensor | None, importance: ExpertImportance = "reap",
                  batch_size: int = 8, seed: int = 0) -> dict[int, torch.Tensor]:
    """One score per expert of every MoE layer (``{layer: [E]}``, float64; higher = more important)."""
    if importance not in EXPERT_IMPORTANCES:
        raise ExpertPruningError(f"--expert_importance {importance!r}: choose one of {', '.join(EXPERT_IMPORTANCES)}")
    layers = moe_layers(model)
    if importance == "random":
        g = torch.Generator().manual_seed(seed)
        return {m.index: torch.rand(m.num_experts, generator=g, dtype=torch.float64) for m in layers}
    if examples is None:
        raise ExpertPruningError(f"--expert_importance {importance}: needs calibration data (--calibration_data)")
    device = next(model.parameters()).device
    if device.type == "meta":  # offloaded to disk by accelerate: its hooks bring inputs to each layer
        device = torch.device("cpu")
    model.eval()
    with _Recorder(layers, reap=importance == "reap") as rec:
        for start in tqdm(range(0, len(examples), batch_size), desc=f"expert scores ({importance})", leave=False):
            model(input_ids=examples[start:start + batch_size].to(device), use_cache=False)
    if importance == "frequency":
        return rec.counts
    return {i: rec.weighted[i] / rec.counts[i].clamp_min(1) for i in rec.counts}


def choose_experts(model: nn.Module, n_remove: int, examples: torch.Tensor | None,
                   importance: ExpertImportance = "reap", batch_size: int = 8, seed: int = 0) -> PruningPlan:
    """A plan removing the ``n_remove`` lowest-scored experts of every MoE layer (ties: the lower index goes)."""
    check_expert_count(model, n_remove)
    scores = expert_scores(model, examples, importance, batch_size=batch_size, seed=seed)
    removed = {}
    groups = expert_groups(model.config)
    for layer, s in scores.items():
        size = len(s) // groups  # the same number leaves every group, so the groups stay contiguous and equal
        drop = sorted(g * size + e for g in range(groups)
                      for e in torch.argsort(s[g * size:(g + 1) * size], stable=True)[:n_remove // groups].tolist())
        removed[f"experts@{layer}"] = drop
        logger.info("layer %d: expert %s %s; removing %s", layer, importance,
                    [round(float(v), 4) for v in s], drop)
    return PruningPlan(removed_units=removed)


def kept_experts(plan: PruningPlan, model: nn.Module) -> dict[int, list[int]]:
    """``{layer: kept expert indices}`` from a plan of ``choose_experts`` (replayable on a fresh model)."""
    keep = {}
    for moe in moe_layers(model):
        gone = set(plan.removed_units.get(f"experts@{moe.index}", []))
        keep[moe.index] = [e for e in range(moe.num_experts) if e not in gone]
    return keep


@torch.no_grad()
def remove_experts(model: nn.Module, keep: dict[int, list[int]]) -> None:
    """Keep only experts ``keep[layer]`` (in order) in every MoE layer: the experts' ``[E, ...]``
    parameters and the router's rows (and bias) are sliced, and every ``num_experts`` attribute and the
    config's count follow."""
    layers = moe_layers(model)
    counts = {len(keep[m.index]) for m in layers if m.index in keep}
    if set(keep) != {m.index for m in layers} or len(counts) != 1:
        got = {k: len(v) for k, v in keep.items()}
        raise ExpertPruningError("remove_experts: give the kept experts of every MoE layer, the same number in each "
                                 f"(MoE layers {[m.index for m in layers]}, got counts {got})")
    n_new = counts.pop()
    counts = {k: getattr(model.config, k) for k in COUNT_KEYS if hasattr(model.config, k)}
    set_expert_count(counts, n_new, f"model_type {getattr(model.config, 'model_type', None)!r}")
    for moe in layers:
        n = moe.num_experts
        idx = torch.tensor(keep[moe.index], dtype=torch.long)
        if len(set(keep[moe.index])) != len(idx) or idx.min() < 0 or idx.max() >= n:
            raise ExpertPruningError(f"remove_experts: layer {moe.index} keeps {keep[moe.index]}, not distinct "
                                     f"experts of 0..{n - 1}")
        # the experts' [E, ...] tensors, the router's rows (its bias, a score-correction bias) and a
        # block-level score-correction bias (MiniMax-M2)
        for module in [moe.block, moe.experts] + list(moe.router.modules()):
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t.dim() >= 1 and t.shape[0] == n:
                    _replace(module, name, t, t.index_select(0, idx.to(t.device)).contiguous())
        for module in [moe.block, moe.experts] + list(moe.router.modules()):
            for attr in COUNT_KEYS:
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, n_new)
    for module in (model, getattr(model, "model", None)):  # e.g. the causal LM's count for the balancing loss
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = n_new
    for key, value in counts.items():
        setattr(model.config, key, value)
    logger.info("kept %d experts in each of %d MoE layers (config %s)", n_new, len(layers), counts)


def _replace(module: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new, persistent=name not in module._non_persistent_buffers_set)
