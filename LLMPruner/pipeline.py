"""One pipeline: ``prune_with(source, config, examples)`` runs discover -> score -> select -> compensate ->
shrink with the settings of a ``PruneConfig``, whether the weights are resident (a model, pruned in place:
``prune.prune``) or streamed a decoder layer at a time (``config.runtime.offload``: a folder or a model whose
CPU copy is streamed, ``stream.pipeline.prune_offloaded``). The configuration is validated here, once; the
keywords of both paths come from the one mapping below.

Where a method needs the whole model (refused under ``--offload`` by ``PruneConfig.validate``):

| setting | in memory | streamed (``--offload``) |
|---|---|---|
| ``--layer_wise``, ``--iterative_steps > 1``, ``--prune_layers``, ``--query_heads`` | yes | no |
| ``--offload_sequential``, ``--max_memory``, ``--offload_states_to_disk`` | no | yes |
| everything else (scores, budgets, OBS + allocation, refit, reconstruction, bias) | yes | yes, the same units and weights |
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from LLMPruner.config import PruneConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stage_kwargs(config: PruneConfig) -> dict[str, Any]:
    """The keywords both paths take, from the configuration (the one place they are spelled out)."""
    w, h, s, sel, c, cal = config.what, config.how_much, config.score, config.select, config.compensate, \
        config.calibration
    return dict(pruning_ratio=h.pruning_ratio, pruner_type=s.pruner_type, taylor=s.taylor,
                grouping_strategy=s.grouping_strategy, global_pruning=h.global_pruning, seed=cal.seed,
                round_to=h.round_to, param_budget=h.param_budget, compensation=c.compensation, ridge=c.ridge,
                calibration_batch_size=cal.calibration_batch_size, budget_criterion=h.budget_criterion,
                unit_rounding=h.unit_rounding, selection=sel.selection, obs_damp=sel.obs_damp,
                obs_allocation=sel.obs_allocation, reconstruct_steps=c.reconstruct_steps,
                reconstruct_lr=c.reconstruct_lr, linalg_device=config.runtime.linalg_device)


def prune_with(source, config: PruneConfig, examples: torch.Tensor | None = None, *, ranges: dict | None = None,
               save_to: str | Path | None = None, tokenizer=None, provenance: dict | None = None):
    """Prune ``source`` as ``config`` says; ``ranges``: ``attention_layers`` / ``mlp_layers`` resolved for the
    model (``prune_run.check_against_model``). Returns ``prune.PruneResult`` in memory (``source`` pruned in
    place) or ``stream.pipeline.OffloadResult`` streamed (the checkpoint written to ``save_to``)."""
    config.validate()
    kwargs = {**stage_kwargs(config), **(ranges or {})}
    mode = config.what.mode
    if mode == "experts":
        raise ValueError("prune_with prunes widths and layers; whole experts: experts.choose_experts / remove_experts")
    if kwargs["pruning_ratio"] is None:
        kwargs["pruning_ratio"] = 0.5  # hf_prune.py's default, unused when a budget is given
    if config.runtime.offload:
        from LLMPruner.stream.pipeline import prune_offloaded
        rt = config.runtime
        return prune_offloaded(source, save_to=save_to, tokenizer=tokenizer,
                               mode="channel_wise" if mode == "channel_wise" else "block_wise", examples=examples,
                               sequential=rt.offload_sequential, device=rt.device or "cpu", dtype=DTYPES[rt.dtype],
                               max_memory=rt.max_memory, offload_states_to_disk=rt.offload_states_to_disk,
                               provenance=provenance, **kwargs)
    from LLMPruner.prune import prune
    w = config.what
    return prune(source, mode=mode, layer=w.layer, iterative_steps=config.how_much.iterative_steps,
                 prune_layers=w.prune_layers, layer_importance=w.layer_importance, query_heads=w.query_heads,
                 examples=examples, **kwargs)
