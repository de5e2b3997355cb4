"""Sequential compensation: prune and refit one decoder layer at a time, on the inputs the *pruned*
model actually produces (SparseGPT / SlimGPT style).

Hidden-state streams go through the decoder layer by layer over the calibration samples: the dense
model's and the pruned-so-far model's. In layer ``L``, for each consumer (``o_proj`` then ``down_proj``:
the linear layers whose input channels lose units), the consumer's inputs are captured in both streams
(``x`` dense, ``x~`` pruned) and the layer's kept input columns are refitted by ``refit_layer`` to map
``x~_K`` to ``W x~`` (default) or to the dense output ``W x``, with a per-layer fallback to plain slicing
when that is not better on held-out calibration tokens (``refit_sequential_layer``). Then the units are
sliced away and the streams move to layer ``L + 1``. Errors are corrected where they arise instead of
compounding, as one-shot compensation from dense-model statistics does.

The layer-streamed pass (``stream/apply.py``) runs the same per-layer step and, with
``--offload_sequential``, also the one-shot candidate, keeping the lower calibration loss (``log_choice``).
``--compensation refit`` itself is not guarded that way: the calibration loss is the fitted data, and on
stories260K (wanda, 35 % budget, 128 x 128 tokens) such a guard keeps the one-shot model whose held-out
perplexity is worse (17.63 vs 16.89).

Library entry point: ``sequential_prune``. The per-layer step (``refit_sequential_layer``, ``Forward``)
takes streams of batches and a layer call, so the layer-streamed pass (``stream/apply.py``) runs the
same code.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch
import torch.nn as nn

from LLMPruner.score.activations import InputStats, activation_channel_scores
from LLMPruner.adapters import get_adapter
from LLMPruner.compensate.refit import CrossStats, linalg_place, refit_layer
from LLMPruner.score.estimate import unit_scores
from LLMPruner.discover import Family
from LLMPruner.plan import PruningPlan
from LLMPruner.compensate.reconstruct import Reconstruction, reconstruct_layer, streams_runner
from LLMPruner.select.units import make_plan
from LLMPruner.shrink import apply_plan

logger = logging.getLogger(__name__)

#: ``forward(layer, b, h)``: the decoder layer ``layer`` on batch ``b``'s input ``h`` -> output states
Forward = Callable[[nn.Module, int, torch.Tensor], torch.Tensor]
# (model, group, chosen, consumer, stats) -> chosen: a selection made on the pruned stream, e.g. obs.obs_reselect()
Reselect = Callable[..., dict]


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, examples: torch.Tensor, batch_size: int):
    """Per batch: the first decoder layer's input hidden states and keyword arguments (mask, rotary)."""
    layers = get_adapter(model).decoder_layers(model)
    device = next(model.parameters()).device
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for s in range(0, len(examples), batch_size):
            try:
                model(input_ids=examples[s:s + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return [(h, {k: v for k, v in kw.items() if k not in ("hidden_states",)}) for h, kw in captured]


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def cross_stats(forward: Forward, layer: nn.Module, rel: str, pruned_h: Sequence[torch.Tensor],
                device: str | torch.device | None = None) -> tuple[CrossStats, CrossStats]:
    """Run the pruned stream through layer ``L`` and accumulate the statistics of consumer ``rel``'s input
    (the refit fits ``V x~_K`` to ``W x~``, SparseGPT's layer-wise objective): (fit, check) from alternate
    tokens (odd/even positions of every sample: both halves see every text). The statistics are kept on
    ``device`` (default: the host; ``--linalg_device``). (Targets toward the dense outputs or the residual
    stream's error lost on SmolLM2 and stories260K: docs/tried_and_dropped.md.)"""
    seen: dict[str, torch.Tensor] = {}
    hook = layer.get_submodule(rel).register_forward_pre_hook(lambda m, a: seen.__setitem__("xp", a[0]))
    fit = check = None
    try:
        for b, hp in enumerate(pruned_h):
            forward(layer, b, hp)
            xp = seen["xp"].float()                                      # [B, T, in]
            d = xp.shape[-1]
            if fit is None:
                fit, check = (CrossStats.empty(d, dense=False, device=device) for _ in range(2))
            for stats, half in ((fit, slice(0, None, 2)), (check, slice(1, None, 2))):
                stats.add(None, xp[:, half].reshape(-1, d), None)
    finally:
        hook.remove()
    return fit, check


def refit_sequential_layer(model: nn.Module, layer: nn.Module, fams: list[Family], removed: dict[str, list[int]],
                           forward: Forward, pruned_h, layer_prefix: str, *,
                           ridge: float | None = None, reselect: str | Reselect | None = None, grouping: str = "sum",
                           linalg_device: str | torch.device | None = None) -> PruningPlan:
    """Layer ``L`` (``layer``, the model's own module, dense on entry) refit and sliced in place, consumer
    by consumer, on the pruned stream ``pruned_h``; returns the layer's plan (its kept indices and the
    units removed, re-chosen when ``reselect`` names an activation metric). ``linalg_device``: where the
    statistics and the refit's float64 solves live (default: the host)."""
    out = PruningPlan()
    groups = _by_consumer(model, fams, layer_prefix)
    for consumer, group in groups:
        rel = consumer[len(layer_prefix):].rpartition(".")[0]
        fit, check = cross_stats(forward, layer, rel, pruned_h, linalg_device)
        chosen = {f.key: removed.get(f.key, []) for f in group}
        if callable(reselect):  # e.g. obs.obs_reselect(): (model, group, chosen, consumer, stats)
            chosen = reselect(model, group, chosen, consumer, fit.merged(check))
        elif reselect:
            chosen = _reselect(model, group, chosen, consumer, fit.merged(check), reselect, grouping)
        plan = make_plan(model, group, chosen)
        out.keep.update(plan.keep)
        out.removed_units.update(plan.removed_units)
        _refit_and_slice(model, plan, consumer, fit, check, ridge, linalg_device)
    return out


def sequential_prune(model: nn.Module, families: list[Family], removed: dict[str, list[int]],
                     examples: torch.Tensor, *, ridge: float | None = None, batch_size: int = 8,
                     reselect: str | Reselect | None = None, grouping: str = "sum",
                     reconstruct: Reconstruction | None = None,
                     linalg_device: str | torch.device | None = None) -> PruningPlan:
    """Apply ``removed`` (``{family key: units}``) layer by layer with refitted consumers; returns the plan
    applied: each sliced parameter's kept indices (in the dense model's shapes, so ``apply_plan`` replays
    the structure on a fresh model) and the units actually removed (``reselect="wanda"``/``"fluctuation"`` re-chooses the same *number* of units
    in each family from the pruned model's own input statistics; a callable ``reselect(model, group,
    chosen, consumer, stats)`` does the same its own way, e.g. ``obs.obs_reselect()``). Families must be
    per-layer.
    The refit fits ``V x~_K`` to ``W x~`` (SparseGPT's layer-wise objective). ``reconstruct`` (steps > 0) then
    takes gradient steps on each pruned layer's MLP toward the dense MLP on the same inputs
    (``reconstruct.py``). ``linalg_device``: where the refit's float64 statistics and solves run (default:
    the host; ``obs_reselect(device=)`` for OBS's)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    by_layer: dict[int, list[Family]] = {}
    for fam in families:
        assert fam.layer is not None, f"sequential compensation needs per-layer families, got {fam.key}"
        by_layer.setdefault(fam.layer, []).append(fam)
    batches = layer_inputs(model, examples, batch_size)

    def forward(layer, b, h):
        return _out(layer(h, **batches[b][1]))

    pruned_h = [h for h, _ in batches]  # the pruned model's own stream: each layer refits on what it receives
    final = PruningPlan()
    steps = reconstruct is not None and reconstruct.steps > 0
    for li, layer in enumerate(layers):
        fams = by_layer.get(li, [])
        if any(removed.get(f.key) for f in fams):
            dense_layer = copy.deepcopy(layer) if steps else None  # the reconstruction's target
            plan = refit_sequential_layer(model, layer, fams, removed, forward, pruned_h, prefix + f"{li}.",
                                          ridge=ridge, reselect=reselect, grouping=grouping,
                                          linalg_device=linalg_device)
            final.keep.update(plan.keep)
            final.removed_units.update(plan.removed_units)
            if steps:
                reconstruct_mlps(model, layer, dense_layer, fams, removed, prefix + f"{li}.", forward, pruned_h,
                                 reconstruct)
        with torch.no_grad():
            pruned_h = [forward(layer, b, h) for b, h in enumerate(pruned_h)]
    return final


def log_choice(seq_loss: float, one_loss: float, keep_oneshot: bool) -> None:
    logger.info("sequential compensation: calibration loss %.6f sequential, %.6f one-shot: keeping the %s model",
                seq_loss, one_loss, "one-shot" if keep_oneshot else "sequential")


@torch.no_grad()
def calibration_loss(model: nn.Module, examples: torch.Tensor, batch_size: int = 8) -> float:
    """The model's mean language-model loss over ``examples`` (equal-length windows), batch by batch."""
    device = next(model.parameters()).device
    total = 0.0
    for s in range(0, len(examples), batch_size):
        ids = examples[s:s + batch_size].to(device)
        total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * len(ids)
    return total / len(examples)


def reconstruct_mlps(model: nn.Module, layer: nn.Module, dense_layer: nn.Module, fams: list[Family],
                     removed: dict[str, list[int]], layer_prefix: str, forward: Forward,
                     pruned_h: Sequence[torch.Tensor], how: Reconstruction) -> None:
    """Reconstruct the layer's MLP toward ``dense_layer``'s (a copy taken before the refit) on the pruned
    stream ``pruned_h``, if its channels lost units (``reconstruct.py``); both passes call this."""
    adapter = get_adapter(model)
    for consumer, group in _by_consumer(model, fams, layer_prefix):
        if adapter.kind_of(consumer) == "mlp" and any(removed.get(f.key) for f in group):
            rel = consumer[len(layer_prefix):].rpartition(".")[0]
            reconstruct_layer(layer, dense_layer, rel, streams_runner(forward, pruned_h), how, layer_prefix)



def _by_consumer(model, fams, layer_prefix):
    """Group a layer's families by the linear layer whose input they prune, in the model's order."""
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    groups: dict[str, list[Family]] = {}
    for fam in fams:
        names = [m.param for m in fam.members if m.dim == 1 and m.param.startswith(layer_prefix)
                 and m.param.endswith(".weight")]
        assert len(names) == 1, f"{fam.key}: expected one consumer, got {names}"
        groups.setdefault(names[0], []).append(fam)
    return sorted(groups.items(), key=lambda kv: order[kv[0]])


def _reselect(model, group, chosen, consumer, stats: CrossStats, metric, grouping):
    s = InputStats(stats.count, stats.total, stats.gram.diagonal().clone(), None)
    channel = activation_channel_scores(model, group, {consumer: s}, metric)
    scores = unit_scores(group, channel, grouping)
    out = {}
    for f in group:
        n = len(chosen.get(f.key, []))
        out[f.key] = sorted(torch.argsort(scores[f.key], stable=True)[:n].tolist())
    return out


@torch.no_grad()
def _refit_and_slice(model, plan: PruningPlan, consumer, fit, check, ridge, device=None) -> None:
    keep = plan.keep.get(consumer, {}).get(1)
    if keep is None:
        return
    w = dict(model.named_parameters())[consumer]
    where = linalg_place(device)
    kept = torch.as_tensor(keep, device=where)
    new, report = refit_layer(w.detach().double().to(where), fit, kept, ridge, check)
    logger.info("%s: %s", consumer, report)
    w[:, kept.to(w.device)] = new.to(w.dtype).to(w.device)  # the model may be on another device than the solve
    apply_plan(model, plan)
