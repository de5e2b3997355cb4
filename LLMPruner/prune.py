"""The pruning pipeline as one library call: discover -> score -> select -> shrink, repeated per step.

Modes (the reference's):
* ``block_wise``: attention heads (whole KV groups under GQA) in ``attention_layers`` and MLP channels in
  ``mlp_layers`` (half-open ranges), each layer losing the same fraction by default;
* ``channel_wise``: the hidden size, model-wide;
* ``layer_wise``: keep the first ``layer`` decoder layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from .adapters import get_adapter
from .estimate import Grouping, PrunerType, TaylorMode, estimate
from .graph import discover
from .plan import PruningPlan
from .select import choose, make_plan
from .shrink import apply_plan
from .structure import ModelStructure

logger = logging.getLogger(__name__)

Mode = Literal["block_wise", "channel_wise", "layer_wise"]


@dataclass
class PruneResult:
    plans: list[PruningPlan] = field(default_factory=list)
    structure: ModelStructure | None = None


def check_layer_range(flag: str, start: int, end: int, num_layers: int) -> range:
    if not (0 <= start < end <= num_layers):
        raise ValueError(f"{flag}_start/_end = {start}..{end}: need 0 <= start < end <= {num_layers} "
                         f"(the model has {num_layers} decoder layers; the range is half-open)")
    return range(start, end)


def prune(model: nn.Module, *, mode: Mode = "block_wise", pruning_ratio: float = 0.5,
          pruner_type: PrunerType = "l2", taylor: TaylorMode = "param_first",
          grouping_strategy: Grouping = "sum", attention_layers: range | None = None,
          mlp_layers: range | None = None, layer: int | None = None, iterative_steps: int = 1,
          global_pruning: bool = False, examples: torch.Tensor | None = None, seed: int = 0,
          round_to: int = 1) -> PruneResult:
    """Prune ``model`` in place and return the plans applied (replayable with ``apply_plan``)."""
    if not 0.0 <= pruning_ratio < 1.0:
        raise ValueError(f"--pruning_ratio {pruning_ratio}: must be in [0, 1)")
    if iterative_steps < 1:
        raise ValueError(f"--iterative_steps {iterative_steps}: must be >= 1")
    adapter = get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    result = PruneResult()
    if mode == "layer_wise":
        if layer is None or not 1 <= layer <= n_layers:
            raise ValueError(f"--layer {layer}: must be between 1 and {n_layers} (layers to keep)")
        plan = PruningPlan(keep_layers=list(range(layer)))
        result.plans.append(plan)
        result.structure = apply_plan(model, plan)
        return result
    if mode not in ("block_wise", "channel_wise"):
        raise ValueError(f"mode {mode!r}: choose block_wise, channel_wise or layer_wise")

    original: dict[str, int] | None = None
    for step in range(1, iterative_steps + 1):
        targets = _targets(discover(model).families, mode, attention_layers, mlp_layers)
        if original is None:
            original = {f.key: f.n_units for f in targets}
        ratio = pruning_ratio * step / iterative_steps
        scores = estimate(model, targets, pruner_type=pruner_type, taylor=taylor,
                          grouping=grouping_strategy, examples=examples, seed=seed + step)
        removed = choose(targets, scores, ratio, global_pruning, round_to, original)
        plan = make_plan(model, targets, removed)
        logger.info("step %d/%d (ratio %.3f):\n%s", step, iterative_steps, ratio, plan.describe())
        result.plans.append(plan)
        result.structure = apply_plan(model, plan)
    if result.structure is None:
        result.structure = adapter.read_structure(model)
    return result


def _targets(families, mode: Mode, attention_layers: range | None, mlp_layers: range | None):
    if mode == "channel_wise":
        return [f for f in families if f.kind == "hidden"]
    attention_layers = attention_layers if attention_layers is not None else range(0)
    mlp_layers = mlp_layers if mlp_layers is not None else range(0)
    return [f for f in families
            if (f.kind == "attention" and f.layer in attention_layers)
            or (f.kind == "mlp" and f.layer in mlp_layers)]
