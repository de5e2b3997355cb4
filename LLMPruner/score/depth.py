"""Depth pruning: remove whole decoder layers chosen by importance (not only "keep the first N").

* ``block_influence`` (ShortGPT): ``1 - cos(x_in, x_out)`` of a layer's input and output hidden states,
  averaged over calibration tokens; a layer that barely changes its input matters least.
* ``ppl`` (SLEB / Shortened LLaMA): the calibration loss with the layer skipped; the layer whose removal
  hurts least goes first. Layers are removed one at a time, re-measuring after each removal.
* ``taylor``: ``sum |W * g|`` over the layer's parameters (Shortened LLaMA's Taylor+).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from LLMPruner.adapters import get_adapter
from LLMPruner.plan import PruningPlan

logger = logging.getLogger(__name__)

LayerImportance = Literal["block_influence", "ppl", "taylor"]
from LLMPruner.options import LAYER_IMPORTANCES  # noqa: E402,F401  (re-exported)


@torch.no_grad()
def block_influence(model: nn.Module, examples: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    layers = get_adapter(model).decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = 0

    def hook(i):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
            total[i] += (1 - cos).sum().cpu()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return total / count


@torch.no_grad()
def _loss(model: nn.Module, examples: torch.Tensor, batch_size: int = 8) -> float:
    device = next(model.parameters()).device
    losses = [model(input_ids=examples[s:s + batch_size].to(device), labels=examples[s:s + batch_size].to(device),
                    use_cache=False).loss.item() for s in range(0, len(examples), batch_size)]
    return sum(losses) / len(losses)


def taylor_layer_scores(model: nn.Module, examples: torch.Tensor) -> torch.Tensor:
    layers = get_adapter(model).decoder_layers(model)
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    model(input_ids=examples.to(device), labels=examples.to(device), use_cache=False).loss.backward()
    scores = torch.tensor([sum((p.detach() * p.grad).abs().sum().item() for p in layer.parameters()
                               if p.grad is not None) for layer in layers])
    model.zero_grad(set_to_none=True)
    return scores


def choose_layers(model: nn.Module, n_remove: int, examples: torch.Tensor,
                  importance: LayerImportance = "block_influence") -> PruningPlan:
    """A plan keeping all but the ``n_remove`` least important decoder layers (order preserved)."""
    adapter = get_adapter(model)
    n = len(adapter.decoder_layers(model))
    if not 0 <= n_remove < n:
        raise ValueError(f"--prune_layers {n_remove}: must be between 0 and {n - 1} (the model has {n} layers)")
    if importance not in LAYER_IMPORTANCES:
        raise ValueError(f"--layer_importance {importance!r}: choose one of {', '.join(LAYER_IMPORTANCES)}")
    if importance == "ppl":
        keep = _greedy_by_loss(model, n_remove, examples)
    else:
        scores = block_influence(model, examples) if importance == "block_influence" \
            else taylor_layer_scores(model, examples)
        logger.info("layer importance (%s): %s", importance, [round(float(s), 5) for s in scores])
        drop = set(torch.argsort(scores, stable=True)[:n_remove].tolist())
        keep = [i for i in range(n) if i not in drop]
    return PruningPlan(keep_layers=keep, removed_units={"layers": [i for i in range(n) if i not in keep]})


def _greedy_by_loss(model: nn.Module, n_remove: int, examples: torch.Tensor) -> list[int]:
    keep = list(range(len(get_adapter(model).decoder_layers(model))))
    for _ in tqdm(range(n_remove), desc="depth (loss without each layer)", leave=False):
        trial = {}
        for i in keep:
            with only_layers(model, [j for j in keep if j != i]):
                trial[i] = _loss(model, examples)
        best = min(trial, key=trial.get)
        logger.info("remove layer %d (loss without it %.4f)", best, trial[best])
        keep.remove(best)
    return keep


@contextlib.contextmanager
def only_layers(model: nn.Module, keep: list[int]) -> Iterator[nn.Module]:
    """``model`` running only decoder layers ``keep`` (in that order) inside the block; the original
    layers are back on exit. For forwards without a KV cache (layer indices are not renumbered)."""
    layers = get_adapter(model).decoder_layers(model)
    owner, attr = _container(model, layers)
    setattr(owner, attr, nn.ModuleList([layers[j] for j in keep]))
    try:
        yield model
    finally:
        setattr(owner, attr, layers)


def _container(model: nn.Module, layers: nn.ModuleList) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is layers:
                return module, child_name
    raise RuntimeError("decoder layers not found in the model")
