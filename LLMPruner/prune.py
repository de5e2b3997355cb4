"""The pruning pipeline as one library call: discover -> score -> select -> (compensate) -> shrink.

Modes (the reference's):
* ``block_wise``: attention heads (whole KV groups under GQA) in ``attention_layers`` and MLP channels in
  ``mlp_layers`` (half-open ranges), each layer losing the same fraction by default;
* ``channel_wise``: the hidden size, model-wide;
* ``layer_wise``: keep the first ``layer`` decoder layers.

Beyond the paper: activation-aware scores (``fluctuation``, ``wanda``), query heads inside KV groups as
units (``query_heads``), a global parameter budget (``param_budget``, ranked by ``budget_criterion``),
output compensation (``refit``: sequential, layer by layer; ``bias``; ``refit_oneshot``) and depth pruning
by importance (``prune_layers``), combinable with width pruning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from LLMPruner.score.activations import activation_channel_scores, collect_input_stats, consumers
from LLMPruner.adapters import get_adapter
from LLMPruner.select.budget import BudgetCriterion, check_reachable, choose_by_budget, non_embedding_parameters
from LLMPruner.compensate.refit import Compensation, add_biases, compensate
from LLMPruner.score.depth import LayerImportance, choose_layers
from LLMPruner.score.estimate import PRUNER_TYPES, Grouping, TaylorMode, estimate, unit_scores
from LLMPruner.discover import Family, discover
from LLMPruner.discover.heads import head_family, rank_family
from LLMPruner.select.obs import DAMP, Selection, check_selection, obs_reselect
from LLMPruner.select.allocation import Allocation, obs_counts
from LLMPruner.options import ACTIVATION_PRUNERS, ALL_PRUNERS  # noqa: F401  (re-exported)
from LLMPruner.plan import PruningPlan
from LLMPruner.compensate.reconstruct import LR as RECONSTRUCT_LR, Reconstruction, check_reconstruction
from LLMPruner.select.units import Rounding, channels_per_unit, choose, make_plan
from LLMPruner.compensate.sequential import sequential_prune
from LLMPruner.shrink import apply_plan
from LLMPruner.structure import ModelStructure

logger = logging.getLogger(__name__)

Mode = Literal["block_wise", "channel_wise", "layer_wise"]
PROTECT_FROM = 8  # decoder layers from which a budget without layer ranges leaves the first and last alone


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
          pruner_type: str = "l2", taylor: TaylorMode = "param_first", grouping_strategy: Grouping = "sum",
          attention_layers: range | None = None, mlp_layers: range | None = None, layer: int | None = None,
          iterative_steps: int = 1, global_pruning: bool = False, examples: torch.Tensor | None = None,
          seed: int = 0, round_to: int = 1, param_budget: float | None = None,
          compensation: Compensation = "none", prune_layers: int = 0,
          layer_importance: LayerImportance = "block_influence", calibration_batch_size: int = 8,
          ridge: float | None = None, unit_rounding: Rounding = "reference", query_heads: bool = False,
          budget_criterion: BudgetCriterion = "uniform",
          selection: Selection = "score",
          obs_damp: float = DAMP, obs_prior_weight: float = 0.0,
          obs_allocation: Allocation = "uniform",
          obs_max_fraction: float | None = None, reconstruct_steps: int = 0,
          reconstruct_lr: float = RECONSTRUCT_LR,
          linalg_device: str | torch.device | None = None) -> PruneResult:
    """Prune ``model`` in place and return the plans applied (replayable with ``apply_plan``).
    ``selection="obs"`` (with ``compensation="refit"``): the scores set how many units each family loses,
    structured OBS on the pruned model's inputs chooses which (``obs.py``). ``reconstruct_steps`` (with
    ``compensation="refit"``): Adam steps on each pruned layer's MLP toward the dense MLP on the pruned
    inputs, after the refit (``reconstruct.py``; gradient steps, so reported apart from closed-form).
    ``linalg_device``: where the refit's and OBS's float64 statistics and solves run (default: the host;
    a GPU is much faster on 7B-70B MLPs and needs about five ``[in, in]`` float64 matrices there)."""
    adapter = get_adapter(model)
    adapter.check_width_pruning(model.config)
    n_layers = len(adapter.decoder_layers(model))
    result = PruneResult()
    if mode == "layer_wise":  # the reference's: keep the first ``layer`` layers, no scores, no data
        if compensation not in ("none", None):
            raise ValueError(f"--compensation {compensation} does not apply to --layer_wise, which keeps the "
                             "first --layer decoder layers and changes no weights; drop it, or remove layers "
                             "by importance with --prune_layers N (which --compensation can follow)")
        if layer is None or not 1 <= layer <= n_layers:
            raise ValueError(f"--layer {layer}: must be between 1 and {n_layers} (layers to keep)")
        _apply(model, PruningPlan(keep_layers=list(range(layer))), result)
        return result
    _check(pruning_ratio, iterative_steps, pruner_type, param_budget, examples, compensation)
    check_selection(selection, compensation)
    check_reconstruction(reconstruct_steps, reconstruct_lr, compensation)
    start_params = non_embedding_parameters(model)
    if mode not in ("block_wise", "channel_wise"):
        raise ValueError(f"mode {mode!r}: choose block_wise, channel_wise or layer_wise")
    if prune_layers:
        _apply(model, choose_layers(model, prune_layers, examples, layer_importance), result)
    width = pruning_ratio if param_budget is None else param_budget
    original: dict[str, int] | None = None
    for step in range(1, iterative_steps + 1):
        targets = _targets(discover(model).families, mode, attention_layers, mlp_layers, param_budget)
        if not targets or width == 0:
            break
        if original is None:
            _check_round_to(targets, round_to)
        if compensation in ("refit", "refit_oneshot"):
            _check_tokens(model, targets, examples)
        original = original or {f.key: f.n_units for f in targets}
        ratio = width * step / iterative_steps
        stats = _stats(model, targets, examples, pruner_type, compensation, calibration_batch_size)
        scored = targets + _single_heads(targets) if query_heads else targets
        scores = _scores(model, scored, pruner_type, taylor, grouping_strategy, examples, seed + step, stats)
        if query_heads:  # with a ratio, query heads replace whole KV groups; a budget chooses among both
            targets, scores = _with_query_heads(targets, scores, replace=param_budget is None)
        if param_budget is not None:
            budget = int(ratio * start_params) - (start_params - non_embedding_parameters(model))
            removed = choose_by_budget(model, targets, scores, max(0, budget), round_to, budget_criterion,
                                       bias_compensation=compensation == "bias")
        else:
            removed = choose(targets, scores, ratio, global_pruning, round_to, original, unit_rounding)
        _warn_rounding(targets, removed, round_to)
        if compensation == "refit":
            reselect = pruner_type if pruner_type in ACTIVATION_PRUNERS else None
            if selection == "obs":
                reselect = obs_reselect(obs_damp, scores if obs_prior_weight else None, obs_prior_weight,
                                        device=linalg_device)
                removed = obs_counts(model, targets, removed, examples, obs_allocation, obs_damp,
                                     calibration_batch_size, max_fraction=obs_max_fraction, device=linalg_device)
            plan = sequential_prune(model, targets, removed, examples, ridge=ridge,
                                    batch_size=calibration_batch_size, reselect=reselect,
                                    grouping=grouping_strategy,
                                    reconstruct=Reconstruction(reconstruct_steps, reconstruct_lr, seed=seed),
                                    linalg_device=linalg_device)
            # (already applied layer by layer: the plan records the kept indices and units)
            logger.info("step %d/%d (ratio %.3f), sequential refit:\n%s", step, iterative_steps, ratio,
                        plan.describe())
            result.plans.append(plan)
            result.structure = adapter.read_structure(model)
            continue
        plan = make_plan(model, targets, removed)
        logger.info("step %d/%d (ratio %.3f):\n%s", step, iterative_steps, ratio, plan.describe())
        deltas = compensate(model, plan, stats or {}, compensation, 1e-3 if ridge is None else ridge)
        _apply(model, plan, result)
        if deltas:
            add_biases(model, deltas)
    if result.structure is None:
        result.structure = adapter.read_structure(model)
    return result


def _check(ratio, steps, pruner_type, param_budget, examples, compensation) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--pruning_ratio {ratio}: must be in [0, 1)")
    if param_budget is not None and not 0.0 <= param_budget < 1.0:
        raise ValueError(f"--param_budget {param_budget}: must be in [0, 1)")
    if steps < 1:
        raise ValueError(f"--iterative_steps {steps}: must be >= 1")
    if pruner_type not in ALL_PRUNERS:
        raise ValueError(f"--pruner_type {pruner_type!r}: choose one of {', '.join(ALL_PRUNERS)}")
    needs_data = pruner_type in ACTIVATION_PRUNERS + ("taylor",) or compensation not in ("none", None)
    if needs_data and examples is None:
        raise ValueError(f"--pruner_type {pruner_type} / --compensation {compensation} need calibration examples")


def check_round_to(model: nn.Module, round_to: int, mode: Mode = "block_wise", attention_layers: range | None = None,
                   mlp_layers: range | None = None, param_budget: float | None = None) -> None:
    """``prune``'s refusal of a ``round_to`` wider than a family it would prune, before any work (a trace)."""
    if round_to > 1 and mode in ("block_wise", "channel_wise"):
        _check_round_to(_targets(discover(model).families, mode, attention_layers, mlp_layers, param_budget),
                        round_to)


def check_budget(model: nn.Module, param_budget: float | None, mode: Mode = "block_wise",
                 attention_layers: range | None = None, mlp_layers: range | None = None) -> None:
    """``prune``'s refusal of a budget its units cannot meet, before any work (``budget.BudgetError``)."""
    if param_budget is None or mode not in ("block_wise", "channel_wise"):
        return
    start = non_embedding_parameters(model)
    check_reachable(model, _targets(discover(model).families, mode, attention_layers, mlp_layers, param_budget),
                    int(param_budget * start))


def _check_round_to(targets, round_to: int) -> None:
    """A multiple of ``round_to`` at least as wide as a family keeps all of it: refuse, naming the width."""
    for fam in targets:
        per_unit = channels_per_unit(fam)  # 1 for MLP/hidden, a KV group's query rows for attention
        width = fam.n_units * per_unit
        if 1 < round_to and per_unit < round_to and width <= round_to:
            where = "the hidden size" if fam.layer is None else f"layer {fam.layer}'s {fam.kind}"
            raise ValueError(f"--round_to {round_to}: {where} has only {width} channels, so a multiple of "
                             f"{round_to} keeps them all and prunes nothing; use a --round_to below {width} "
                             f"(or leave that layer out of the --block_*_layer ranges)")


def _warn_rounding(targets, removed: dict[str, list[int]], round_to: int) -> None:
    """Warn about pruned families whose kept channels are not a multiple (never about untouched ones)."""
    if round_to <= 1:
        return
    for fam in targets:
        if not removed.get(fam.key):
            continue
        kept = (fam.n_units - len(removed[fam.key])) * channels_per_unit(fam)
        if kept % round_to:
            logger.warning("%s keeps %d %s channels: not a multiple of --round_to %d (its units are %d wide)",
                           "model" if fam.layer is None else f"layer {fam.layer}", kept, fam.kind, round_to,
                           channels_per_unit(fam))


def check_refit_tokens(num_examples: int, seq_len: int, widest: int, compensation: str = "refit") -> None:
    """A least-squares refit needs at least twice as many calibration tokens as the input it refits is
    wide (half of them fit, half judge the fit): otherwise it is rank-deficient and overfits (SmolLM2's
    1536-wide MLP with the default 10 x 64 tokens: WikiText-2 PPL 53.75 -> 1,148.99, issue 10)."""
    tokens = num_examples * seq_len
    if compensation in ("refit", "refit_oneshot") and tokens < 2 * widest:
        raise ValueError(
            f"--compensation {compensation}: {tokens} calibration tokens ({num_examples} x {seq_len}) for "
            f"inputs {widest} wide: the least squares would be rank-deficient and overfit. Raise "
            f"--num_examples / --calibration_seq_len to at least {2 * widest} tokens (e.g. --num_examples 128 "
            f"--calibration_seq_len 128) or use --compensation none")


def widest_input(model: nn.Module, targets: list[Family] | None = None) -> int:
    """The widest input of a linear layer inside the decoder layers (what a refit may have to fit), or,
    with ``targets``, of one that loses input channels to them (a refit's Gram is its square)."""
    if targets is not None:
        return max((m.in_features for m in consumers(model, targets).values()), default=0)
    layers = get_adapter(model).decoder_layers(model)
    return max((m.in_features for m in layers.modules() if isinstance(m, nn.Linear)), default=0)


def _check_tokens(model, targets, examples) -> None:
    check_refit_tokens(examples.shape[0], examples.shape[1], widest_input(model, targets))


def _single_heads(targets):
    return [h for h in (head_family(f) for f in targets if f.kind == "attention") if h is not None]


def _with_query_heads(targets, scores, replace: bool):
    """Add each layer's query-head family (units ranked by the single heads' scores)."""
    out = []
    for f in targets:
        single = head_family(f) if f.kind == "attention" else None
        if single is None or not replace:
            out.append(f)
        if single is not None:
            fam, s = rank_family(f, single, scores[single.key])
            scores[fam.key] = s
            out.append(fam)
    return out, scores


def _apply(model: nn.Module, plan: PruningPlan, result: PruneResult) -> None:
    result.plans.append(plan)
    result.structure = apply_plan(model, plan)


def _stats(model, targets, examples, pruner_type, compensation, batch_size):
    if pruner_type not in ACTIVATION_PRUNERS and compensation in ("none", "refit", None):
        return None
    return collect_input_stats(model, consumers(model, targets), examples, batch_size,
                               gram=compensation == "refit_oneshot")


def _scores(model, targets, pruner_type, taylor, grouping, examples, seed, stats):
    if pruner_type in ACTIVATION_PRUNERS:
        return unit_scores(targets, activation_channel_scores(model, targets, stats, pruner_type), grouping)
    return estimate(model, targets, pruner_type=pruner_type, taylor=taylor, grouping=grouping,
                    examples=examples, seed=seed)


def _targets(families, mode: Mode, attention_layers, mlp_layers, param_budget):
    if mode == "channel_wise":
        return [f for f in families if f.kind == "hidden"]
    if param_budget is not None and attention_layers is None and mlp_layers is None:
        # the budget spans every layer but, from PROTECT_FROM layers on, the first and the last (pruning
        # them costs most: SmolLM2 1,983 WikiText-2 PPL with them vs 139.65 on layers 4..27, issue 10)
        n = 1 + max((f.layer for f in families if f.layer is not None), default=0)
        keep_out = {0, n - 1} if n >= PROTECT_FROM else set()
        return [f for f in families if f.kind in ("attention", "mlp") and f.layer not in keep_out]
    attention_layers = attention_layers if attention_layers is not None else range(0)
    mlp_layers = mlp_layers if mlp_layers is not None else range(0)
    return [f for f in families
            if (f.kind == "attention" and f.layer in attention_layers)
            or (f.kind == "mlp" and f.layer in mlp_layers)]
