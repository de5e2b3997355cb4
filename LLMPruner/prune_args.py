"""hf_prune.py's flags beyond the reference's (budgets, compensation, OBS, depth, experts) and for models
larger than the device (offload, placement); recipes and configuration files laid under the explicit flags.
The pruning options are checked in one place, ``PruneConfig.validate`` (``LLMPruner/config.py``)."""
from __future__ import annotations

import argparse

from LLMPruner.options import (ALLOCATIONS, BUDGET_CRITERIA, COMPENSATIONS, DAMP, EXPERT_IMPORTANCES, LAYER_IMPORTANCES,
                      RECONSTRUCT_LR, ROUNDINGS, SELECTIONS, parse_count)


def add_beyond_args(p: argparse.ArgumentParser) -> None:
    """Flags beyond the reference: budgets, compensation, OBS selection, query heads, depth."""
    b = p.add_argument_group("beyond LLM-Pruner (retraining-free quality, depth)")
    b.add_argument("--param_budget", type=float, default=None,
                   help="remove this fraction of the non-embedding parameters, spread over heads and MLP channels "
                        "by --budget_criterion (replaces --pruning_ratio; layer ranges apply only if given)")
    b.add_argument("--target_params", default=None,
                   help="prune to this many parameters in all (e.g. 6B, 118.6M, 118589760; embeddings and head "
                        "included, never pruned): sets --param_budget from the model's own counts; the result "
                        "has the target plus less than one unit")
    b.add_argument("--compensation", default="none", choices=COMPENSATIONS,
                   help="correct o_proj/down_proj for removed inputs: refit (least squares layer by layer on "
                        "the pruned model's inputs, stock architecture, recommended; needs >= 2x the input "
                        "width in calibration tokens) or bias (FLAP)")
    b.add_argument("--selection", default="score", choices=SELECTIONS,
                   help="which units go: score (the lowest --pruner_type scores) or obs (structured Optimal "
                        "Brain Surgeon on the pruned model's inputs, layer by layer, LLMPruner/select/obs.py; the "
                        "scores then only set how many units each family loses; needs --compensation refit)")
    b.add_argument("--obs_damp", type=float, default=DAMP,
                   help="--selection obs: damping of X^T X, relative to its mean diagonal")
    b.add_argument("--obs_allocation", default="uniform", choices=ALLOCATIONS,
                   help="--selection obs: units per layer as the budget/ratio gives them (uniform) or spent "
                        "where the OBS error relative to the layer's residual stream is smallest (residual, "
                        "LLMPruner/select/allocation.py: the best measured on SmolLM2 at -12 %% and -20 %%; "
                        "uniform at -29 %%)")
    b.add_argument("--query_heads", action="store_true",
                   help="also prune query heads inside each KV group (the same count per group); with "
                        "--pruning_ratio they replace whole KV groups")
    b.add_argument("--skip_attention", action="store_true",
                   help="prune MLP channels only (no heads), the best measured structure on SmolLM2")
    b.add_argument("--budget_criterion", default="uniform", choices=BUDGET_CRITERIA,
                   help="--param_budget allocation: the same fraction of every family in the layer ranges "
                        "(best measured), score per parameter removed, or per-family z-scores")
    b.add_argument("--unit_rounding", default="reference", choices=ROUNDINGS,
                   help="units removed per layer at --pruning_ratio: as the reference (floor, in the "
                        "channels of k_proj / the MLP) or nearest")
    b.add_argument("--reconstruct_steps", type=int, default=0,
                   help="with --compensation refit: after each pruned layer's refit, this many Adam steps on its "
                        "MLP toward the dense MLP on the pruned inputs (LLMPruner/compensate/reconstruct.py; gradient steps "
                        "on the calibration tokens, no labels: 200 measured on SmolLM2); 0 = closed form only")
    b.add_argument("--reconstruct_lr", type=float, default=RECONSTRUCT_LR,
                   help="--reconstruct_steps: Adam's learning rate")
    b.add_argument("--linalg_device", default="cpu",
                   help="--compensation refit: where its float64 statistics, OBS selection and least-squares "
                        "solves run: cpu (default, host memory), cuda / cuda:N, or auto (= --device). A GPU is "
                        "far faster on 7B-70B MLPs (hours of host linear algebra at 70B) and needs about five "
                        "[in, in] float64 matrices of the widest refitted input there (4.6 GB at 11,008, "
                        "33 GB at 28,672)")
    b.add_argument("--ridge", type=float, default=None,
                   help="ridge of the refit, relative to the mean Gram diagonal (default: refit chooses it per "
                        "layer on held-out calibration tokens)")
    b.add_argument("--prune_layers", type=int, default=0, help="remove this many whole decoder layers first")
    b.add_argument("--layer_importance", default="block_influence", choices=LAYER_IMPORTANCES,
                   help="how --prune_layers chooses layers")
    b.add_argument("--calibration_batch_size", type=int, default=8, help="samples per forward for statistics")


def add_expert_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture-of-experts models (LLMPruner/experts/core.py)")
    g.add_argument("--prune_experts", type=int, default=0,
                   help="remove this many whole experts from every MoE layer (the same count in each, so the "
                        "result is a stock checkpoint with fewer experts); nothing else is pruned")
    g.add_argument("--expert_importance", default="reap", choices=EXPERT_IMPORTANCES,
                   help="--prune_experts: which experts go: reap (router weight x output norm, averaged over the "
                        "tokens routed to the expert; REAP, 2025), frequency (how often the router chooses it) "
                        "or random")


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models larger than the device (docs/offload.md)")
    g.add_argument("--offload", action="store_true",
                   help="keep the weights on disk (the checkpoint's safetensors) and bring one decoder layer at a "
                        "time to --device; the pruned model is written to the run folder shard by shard")
    g.add_argument("--max_memory", default=None,
                   help="device memory budget, e.g. 8GB: checked against one --offload stage; per GPU for "
                        "--device_map auto")
    g.add_argument("--device_map", default=None,
                   help="in memory across devices (not with --offload): auto, balanced, sequential, a device, "
                        "or a JSON module->device map (accelerate's big-model placement)")
    g.add_argument("--offload_states_to_disk", action="store_true",
                   help="with --offload: keep the boundary hidden states in temporary files instead of host memory")
    g.add_argument("--offload_sequential", action="store_true",
                   help="with --offload: compensate (and, for per-layer wanda/fluctuation, re-select) layer i on the "
                        "outputs of the already pruned layers 0..i-1, build the one-shot candidate in the same pass "
                        "and keep whichever has the lower calibration loss (about 1.3-1.5x the time)")


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations of the flags given on the command line (abbreviations included): a recipe or a
    configuration file sets every other one."""
    unset = object()
    seen = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_known_args(argv, seen)  # argparse only fills defaults of attributes the namespace lacks
    return {k for k, v in vars(seen).items() if v is not unset}


def apply_sources(args: argparse.Namespace, explicit: set[str]) -> None:
    """``--config FILE`` then ``--recipe NAME`` under the explicit flags, then ``PruneConfig.validate``: the
    one place the pruning options are checked (``ValueError`` naming the flag). ``--recipe auto`` checks
    every candidate recipe with the explicit flags now, and is resolved by ``prune_run``."""
    from LLMPruner.config import PruneConfig
    from LLMPruner.recipe import AUTO, auto_recipes, load_recipe, overlay
    if args.config:
        overlay(args, PruneConfig.load(args.config).to_args(), explicit)
    if args.recipe == AUTO:
        for recipe in auto_recipes():
            trial = argparse.Namespace(**vars(args))
            overlay(trial, recipe.flags(), explicit)
            PruneConfig.from_flat(vars(trial)).validate()
        args.recipe_explicit = sorted(explicit)
    elif args.recipe:
        overlay(args, load_recipe(args.recipe).flags(), explicit)
    PruneConfig.from_flat(vars(args)).validate()
    if args.target_params is not None:
        args.target_params = parse_count(args.target_params)


def check_run_flags(args: argparse.Namespace) -> None:
    """What the run does besides pruning, against the pruning options (the rest: ``PruneConfig.validate``)."""
    if args.prune_experts and args.save_gguf:
        raise ValueError(f"--prune_experts {args.prune_experts} removes whole experts and nothing else; drop "
                         "--save_gguf (the GGUF exporter writes dense LLaMA-family models)")
    if getattr(args, "recipe", None) == "auto" and (args.offload or args.prune_experts or args.layer_wise):
        given = "--offload" if args.offload else "--prune_experts" if args.prune_experts else "--layer_wise"
        raise ValueError(f"--recipe auto with {given}: auto prunes the model in memory once per width recipe; "
                         "choose a recipe by name (--list_recipes)")
    if args.offload:
        bad = [flag for flag, given in (("--test_before_train", args.test_before_train),
                                        ("--save_gguf (run export.py on the saved folder)", args.save_gguf)) if given]
        if bad:
            raise ValueError(f"--offload cannot be combined with {', '.join(bad)} (the layer-streamed pass never "
                             "holds the whole model); drop them or prune without --offload")


def needs_calibration(args: argparse.Namespace) -> bool:
    """Whether the run reads calibration text (--layer_wise keeps the first --layer layers: no data)."""
    if args.prune_experts:
        return args.expert_importance != "random"
    return (args.pruner_type in ("taylor", "fluctuation", "wanda") or args.compensation != "none"
            or args.prune_layers > 0) and not args.layer_wise
