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
   with ``refit`` (``sequential.refit_sequential_layer``, the in-memory sequential refit), the pruned and
   refit layer's output, so layer i+1 is compensated on the inputs the already-pruned layers 0..i
   really produce. With ``guard`` (``--offload_sequential``) both candidates are built in the same pass
   (three streams: dense, one-shot, sequential; two shard writers) and the one with the lower
   calibration loss is kept (docs/offload.md).

Without statistics (Taylor, magnitude plans) the pass only loads, slices and writes.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from LLMPruner.score.activations import activation_channel_scores, consumers, input_stats_hook
from LLMPruner.adapters import get_adapter
from LLMPruner.checkpoint.build import tied_keys
from LLMPruner.compensate.refit import Compensation, add_biases, compensate
from LLMPruner.score.estimate import Grouping, unit_scores
from LLMPruner.discover import Family
from LLMPruner.plan import PruningPlan
from LLMPruner.select.units import make_plan
from LLMPruner.compensate.reconstruct import Reconstruction
from LLMPruner.compensate.sequential import Reselect, log_choice, reconstruct_mlps, refit_sequential_layer
from LLMPruner.shrink import apply_plan
from LLMPruner.stream.states import LayerCall, StateStore, capture, mean_head_loss
from LLMPruner.stream.weights import Part, WeightSource, layers_prefix
from LLMPruner.stream.writer import ShardWriter

logger = logging.getLogger(__name__)

Select = Callable[[list[Family], dict[str, torch.Tensor]], dict[str, list[int]]]


@dataclass
class PassOptions:
    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None
    batch_size: int = 8
    compensation: Compensation = "none"
    ridge: float = 1e-3                # the one-shot refit's
    refit_ridge: float | None = None   # the sequential refit's (None: chosen on held-out tokens)
    reselect: str | Reselect | None = None  # the sequential refit re-chooses units on its inputs (wanda,
    #                                         fluctuation, or a callable such as obs.obs_reselect())
    reconstruct: Reconstruction | None = None  # with refit: Adam steps on each pruned MLP (reconstruct.py)
    sequential: bool = False
    guard: bool = False                # with sequential: build the one-shot candidate too, keep the better
    metric: str | None = None          # "wanda"/"fluctuation": score and select each layer in the pass
    grouping: Grouping = "sum"
    linalg_device: str | torch.device | None = None  # the refit's / OBS's float64 matrices (None: host)


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
    sequential = opts.sequential and use_stats
    guard = opts.guard and sequential
    cons = consumers(model, families)
    kinds = _bias_kinds(model, families, plan, select, cons) if opts.compensation == "bias" else []
    dense = states or StateStore()
    seq = StateStore(dense.on_disk, dense.folder) if sequential else None
    one = StateStore(dense.on_disk, dense.folder) if guard else None
    writers = [writer] if writer is not None else []
    if guard and writer is not None:
        writers.append(ShardWriter(tempfile.mkdtemp(prefix=".sequential-", dir=writer.folder), writer.n_shards))
    seq_plan = PruningPlan()
    calls: dict[int, LayerCall] = {}
    if use_stats:
        h0, calls = embed(model, source, examples, opts)
        for store in (dense, seq, one):
            if store is not None:
                store.put(0, h0)
    _write_outer(model, source, prefix, plan, writers, opts)
    need_dense = not sequential or guard or (opts.metric is not None and select is not None)
    for i in tqdm(range(len(layers)), desc="prune and write (per layer)", leave=False):
        part = Part(model, prefix, i)
        part.load(source, opts.device, opts.dtype)
        names = [n for n in cons if n in part.names]
        stats, out = layer_stats(model, layers[i], names, dense.get(i), calls, opts,
                                 gram=opts.compensation in ("refit", "refit_oneshot")) \
            if use_stats and need_dense else ({}, None)
        if opts.metric is not None and collect is not None:
            collect.update(activation_channel_scores(model, families, stats, opts.metric))
        fams = [f for f in families if f.layer == i]
        if opts.metric is not None and select is not None:
            scores = unit_scores(fams, activation_channel_scores(model, fams, stats, opts.metric), opts.grouping)
            layer_plan = make_plan(model, fams, select(fams, scores))
            plan.keep.update(layer_plan.keep)
            plan.removed_units.update(layer_plan.removed_units)
        mine = PruningPlan(keep={n: d for n, d in plan.keep.items() if n in part.names},
                           removed_units={f.key: plan.removed_units.get(f.key, []) for f in fams})
        last = i + 1 == len(layers)
        if sequential:
            seq_layer = copy.deepcopy(layers[i]) if guard else layers[i]
            if guard:  # the one-shot candidate first, in place, then the dense copy becomes the sequential one
                _compensate_and_slice(model, prefix, layers[i], mine, stats, opts, kinds)
                one.put(i + 1, run_layer(layers[i], one.get(i), calls, opts))
                if writers:
                    writers[0].write(layers[i].state_dict(prefix=f"{prefix}.{i}."))
                layers[i] = seq_layer
            stats = None  # spent on the selection and the one-shot candidate: free before the sequential refit
            mine_seq = _sequential_layer(model, prefix, i, seq_layer, fams, mine, names, seq.get(i), calls, opts,
                                         kinds, select)
            seq_plan.keep.update(mine_seq.keep)
            seq_plan.removed_units.update(mine_seq.removed_units)
            seq.put(i + 1, run_layer(seq_layer, seq.get(i), calls, opts))
            if writers:
                writers[-1].write(seq_layer.state_dict(prefix=f"{prefix}.{i}."))
            if need_dense and not last:
                dense.put(i + 1, out)
        else:
            _compensate_and_slice(model, prefix, layers[i], mine, stats, opts, kinds)
            if use_stats and not last:
                dense.put(i + 1, out)
            if writers:
                writers[0].write(layers[i].state_dict(prefix=f"{prefix}.{i}."))
        Part(model, prefix, i).release()
        for store in (dense, seq, one):
            if store is not None:
                store.drop(i)
    result = seq_plan if sequential else plan
    if guard:
        seq_loss, one_loss = (_stream_loss(model, source, prefix, examples, store.get(len(layers)), calls, opts)
                              for store in (seq, one))
        keep_oneshot = one_loss < seq_loss
        log_choice(seq_loss, one_loss, keep_oneshot)
        result = plan if keep_oneshot else seq_plan
        if writers:
            if keep_oneshot:
                writers[1].discard()
            else:
                writers[0].adopt(writers[1])
    for store in (dense, seq, one):
        if store is not None:
            store.close()
    if writer is not None:
        writer.finish()
    return result


def _compensate_and_slice(model, prefix, layer, mine: PruningPlan, stats, opts: PassOptions, kinds) -> None:
    """Layer ``layer`` (the model's) compensated from ``stats`` (one-shot form, layer by layer) and sliced."""
    method = "refit_oneshot" if opts.compensation == "refit" else opts.compensation
    deltas = compensate(model, mine, stats, method, opts.ridge)
    if mine.keep:
        apply_plan(model, mine)
    if kinds:
        with _only_layer(model, prefix, layer):
            for kind in kinds:
                get_adapter(model).enable_biases(model, kind)
        add_biases(model, deltas)


def _sequential_layer(model, prefix, i, layer, fams, mine: PruningPlan, names, x, calls, opts: PassOptions, kinds,
                      select) -> PruningPlan:
    """The sequential candidate of layer ``i`` (the model's ``layer``, dense on entry) on its inputs ``x``:
    ``refit`` as in memory (``sequential.refit_sequential_layer``); otherwise the statistics of ``x``
    re-select the layer (per-layer selection only: the same counts) and compensate it one-shot."""
    if opts.compensation == "refit":
        if not any(mine.removed_units.get(f.key) for f in fams):
            return mine
        chunks = list(x.split(opts.batch_size))

        def forward(module, b, h):
            return calls[len(h)](module, h.to(opts.device))
        steps = opts.reconstruct is not None and opts.reconstruct.steps > 0
        dense_copy = copy.deepcopy(layer) if steps else None  # the reconstruction's target, as in memory
        out = refit_sequential_layer(model, layer, fams, mine.removed_units, forward, chunks, f"{prefix}.{i}.",
                                     ridge=opts.refit_ridge, reselect=opts.reselect, grouping=opts.grouping,
                                     linalg_device=opts.linalg_device)
        if steps:
            reconstruct_mlps(model, layer, dense_copy, fams, mine.removed_units, f"{prefix}.{i}.", forward, chunks,
                             opts.reconstruct)
        return out
    stats, _ = layer_stats(model, layer, names, x, calls, opts, gram=opts.compensation == "refit_oneshot")
    if opts.metric is not None and select is not None:
        scores = unit_scores(fams, activation_channel_scores(model, fams, stats, opts.metric), opts.grouping)
        mine = make_plan(model, fams, select(fams, scores))
    _compensate_and_slice(model, prefix, layer, mine, stats, opts, kinds)
    return mine


def _bias_kinds(model, families, plan: PruningPlan, select, cons) -> list[str]:
    """The kinds whose consumers lose input channels somewhere (``bias`` adds their biases, zero where a
    layer loses nothing, as ``add_biases`` does in memory; a kind that loses nothing gets none). With
    per-layer selection the counts do not depend on the scores, so zero scores give them up front."""
    if select is not None:
        plan = make_plan(model, families, select(families, {f.key: torch.zeros(f.n_units) for f in families}))
    adapter = get_adapter(model)
    return sorted({adapter.kind_of(n) for n in cons if 1 in plan.keep.get(n, {})} - {None})


@torch.no_grad()
def _stream_loss(model, source, prefix, examples, last: torch.Tensor, calls, opts: PassOptions) -> float:
    """The calibration loss of a candidate from its last boundary state (the model's own norm, head, loss)."""
    layers = get_adapter(model).decoder_layers(model)
    outer = Part(model, prefix, None)
    outer.load(source, opts.device, opts.dtype)
    as_tuple = next(iter(calls.values())).as_tuple
    loss = mean_head_loss(model, layers, examples, last, as_tuple, opts.device)
    outer.release()
    return loss


def _write_outer(model, source, prefix, plan: PruningPlan, writers: list, opts: PassOptions) -> None:
    outer = Part(model, prefix, None)
    mine = PruningPlan(keep={n: d for n, d in plan.keep.items() if n in outer.names})
    if not writers and not mine.keep:
        return
    outer.load(source, "cpu", opts.dtype)
    if mine.keep:
        apply_plan(model, mine)
    tied = set(tied_keys(model)) if getattr(model.config, "tie_word_embeddings", False) else set()
    for writer in writers:
        writer.write({k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".") and k not in tied})
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
