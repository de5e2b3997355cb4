"""The layer-by-layer pass: statistics, selection, compensation, shrinking and writing, one layer at a time.

For decoder layer i (its input ``h_i`` is a stored boundary state):

1. load it; run it over ``h_i`` with forward pre-hooks on its consumers (``activations.input_stats_hook``)
   when statistics are needed (activation scores, ``bias``/``refit`` compensation);
2. if no plan was given, score and select its families now (``activation_channel_scores`` ->
   ``unit_scores`` -> ``select.choose``, per layer: the same as in memory, since per-layer selection only
   sees that layer's scores) and add them to the plan;
3. compensate (``compensate.compensate``: ``refit_weight`` / bias deltas from the statistics just
   gathered), slice the layer (``shrink.apply_plan`` restricted to its parameters), write its shard;
4. ``h_{i+1}``: the *dense* layer's output (one-shot: statistics of the dense model, as in memory) or,
   with ``sequential``, the pruned and compensated layer's output, so layer i+1 is compensated on the
   inputs the already-pruned layers 0..i really produce.

Without statistics (Taylor, magnitude plans) the pass only loads, slices and writes.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..activations import activation_channel_scores, consumers, input_stats_hook
from ..adapters import get_adapter
from ..checkpoint.build import tied_keys
from ..compensate import Compensation, add_biases, compensate
from ..estimate import Grouping, unit_scores
from ..graph import Family
from ..plan import PruningPlan
from ..select import make_plan
from ..shrink import apply_plan
from .states import LayerCall, StateStore, capture
from .weights import Part, WeightSource, layers_prefix
from .writer import ShardWriter

logger = logging.getLogger(__name__)

Select = Callable[[list[Family], dict[str, torch.Tensor]], dict[str, list[int]]]


@dataclass
class PassOptions:
    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None
    batch_size: int = 8
    compensation: Compensation = "none"
    ridge: float = 1e-3
    sequential: bool = False
    metric: str | None = None          # "wanda"/"fluctuation": score and select each layer in the pass
    grouping: Grouping = "sum"


def embed(model: nn.Module, source: WeightSource, examples: torch.Tensor, opts: PassOptions
          ) -> tuple[torch.Tensor, dict[int, LayerCall]]:
    """``h_0`` ``[N, T, H]`` (CPU) and the layer call for each chunk size of the pass."""
    layers = get_adapter(model).decoder_layers(model)
    outer = Part(model, layers_prefix(model, layers), None)
    outer.load(source, opts.device, opts.dtype)
    chunks, calls = [], {}
    with torch.no_grad():
        for s in range(0, len(examples), opts.batch_size):
            h, call = capture(model, layers, examples[s:s + opts.batch_size])
            chunks.append(h.cpu())
            calls.setdefault(h.shape[0], call)
    outer.release()
    return torch.cat(chunks), calls


@torch.no_grad()
def run_layer(layer: nn.Module, x: torch.Tensor, calls: dict[int, LayerCall], opts: PassOptions) -> torch.Tensor:
    out = [calls[len(xb)](layer, xb.to(opts.device)).cpu() for xb in x.split(opts.batch_size)]
    return torch.cat(out)


def layer_stats(model: nn.Module, layer: nn.Module, names: list[str], x, calls, opts: PassOptions,
                gram: bool) -> tuple[dict, torch.Tensor]:
    """Input statistics of the consumers ``names`` of ``layer`` over ``x``, and the layer's output."""
    stats: dict = {}
    handles = [model.get_submodule(n.rpartition(".")[0]).register_forward_pre_hook(input_stats_hook(stats, n, gram))
               for n in names]
    try:
        out = run_layer(layer, x, calls, opts)
    finally:
        for h in handles:
            h.remove()
    return stats, out


def streamed_apply(model: nn.Module, source: WeightSource, families: list[Family], plan: PruningPlan | None,
                   writer: ShardWriter | None, opts: PassOptions, *, examples: torch.Tensor | None = None,
                   select: Select | None = None, states: StateStore | None = None,
                   collect: dict | None = None) -> PruningPlan:
    """Prune the meta-device ``model`` layer by layer (see the module docstring); returns the plan.
    ``collect``, when given, receives every consumer's activation channel scores (``opts.metric``)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    prefix = layers_prefix(model, layers)
    plan = plan if plan is not None else PruningPlan()
    use_stats = opts.metric is not None or opts.compensation not in ("none", None)
    cons = consumers(model, families)
    kinds = sorted({adapter.kind_of(n) for n in cons} - {None}) if opts.compensation == "bias" else []
    states = states or StateStore()
    calls: dict[int, LayerCall] = {}
    if use_stats:
        h0, calls = embed(model, source, examples, opts)
        states.put(0, h0)
    _write_outer(model, source, prefix, plan, writer, opts)
    for i in tqdm(range(len(layers)), desc="prune and write (per layer)", leave=False):
        part = Part(model, prefix, i)
        part.load(source, opts.device, opts.dtype)
        names = [n for n in cons if n in part.names]
        stats, out = layer_stats(model, layers[i], names, states.get(i), calls, opts,
                                 gram=opts.compensation in ("refit", "refit_oneshot")) if use_stats else ({}, None)
        if opts.metric is not None and collect is not None:
            collect.update(activation_channel_scores(model, families, stats, opts.metric))
        if opts.metric is not None and select is not None:
            fams = [f for f in families if f.layer == i]
            scores = unit_scores(fams, activation_channel_scores(model, fams, stats, opts.metric), opts.grouping)
            layer_plan = make_plan(model, fams, select(fams, scores))
            plan.keep.update(layer_plan.keep)
            plan.removed_units.update(layer_plan.removed_units)
        mine = PruningPlan(keep={n: d for n, d in plan.keep.items() if n in part.names})
        # one layer at a time, a refit is the least squares of that layer (compensate's one-shot form)
        method = "refit_oneshot" if opts.compensation == "refit" else opts.compensation
        deltas = compensate(model, mine, stats, method, opts.ridge)
        if mine.keep:
            apply_plan(model, mine)
        if kinds:
            with _only_layer(model, prefix, layers[i]):
                for kind in kinds:
                    adapter.enable_biases(model, kind)
            add_biases(model, deltas)
        if use_stats and i + 1 < len(layers):
            states.put(i + 1, run_layer(layers[i], states.get(i), calls, opts) if opts.sequential else out)
        if writer is not None:
            writer.write(layers[i].state_dict(prefix=f"{prefix}.{i}."))
        Part(model, prefix, i).release()
        states.drop(i)
    states.close()
    if writer is not None:
        writer.finish()
    return plan


def _write_outer(model, source, prefix, plan: PruningPlan, writer, opts: PassOptions) -> None:
    outer = Part(model, prefix, None)
    mine = PruningPlan(keep={n: d for n, d in plan.keep.items() if n in outer.names})
    if writer is None and not mine.keep:
        return
    outer.load(source, "cpu", opts.dtype)
    if mine.keep:
        apply_plan(model, mine)
    if writer is not None:
        tied = set(tied_keys(model)) if getattr(model.config, "tie_word_embeddings", False) else set()
        writer.write({k: v for k, v in model.state_dict().items()
                      if not k.startswith(prefix + ".") and k not in tied})
    outer.release()


@contextlib.contextmanager
def _only_layer(model: nn.Module, prefix: str, layer: nn.Module):
    """The model seen by the adapter with ``layer`` as its only decoder layer (model-wide adapter calls
    such as ``enable_biases`` then touch just this layer, plus the config)."""
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    saved = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([layer]))
    try:
        yield
    finally:
        setattr(parent, attr, saved)
