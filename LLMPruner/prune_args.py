"""hf_prune.py's flags beyond the reference's (budgets, compensation, OBS, depth) and for models larger
than the device (offload, placement), with their checks: each check names the flag, the bad value and
what is allowed (``p.error``)."""
from __future__ import annotations

import argparse

from .options import (ALLOCATIONS, BUDGET_CRITERIA, COMPENSATIONS, DAMP, EXPERT_IMPORTANCES, LAYER_IMPORTANCES,
                      RECONSTRUCT_LR, ROUNDINGS, SELECTIONS, check_reconstruction, check_selection, parse_count,
                      parse_device_map, parse_memory)


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
                        "width in calibration tokens), refit_oneshot (from dense statistics) or bias (FLAP)")
    b.add_argument("--selection", default="score", choices=SELECTIONS,
                   help="which units go: score (the lowest --pruner_type scores) or obs (structured Optimal "
                        "Brain Surgeon on the pruned model's inputs, layer by layer, LLMPruner/obs.py; the "
                        "scores then only set how many units each family loses; needs --compensation refit)")
    b.add_argument("--obs_damp", type=float, default=DAMP,
                   help="--selection obs: damping of X^T X, relative to its mean diagonal")
    b.add_argument("--obs_allocation", default="uniform", choices=ALLOCATIONS,
                   help="--selection obs: units per layer as the budget/ratio gives them (uniform) or spent "
                        "where the OBS error relative to the layer's residual stream (residual), per token to "
                        "its RMS (normalized) or to the "
                        "consumer's output (output) is smallest, by the Fisher-weighted errors (fisher: "
                        "estimated loss changes; LLMPruner/obs_allocation.py) or by the measured KL of "
                        "pruning each layer alone (kl: LLMPruner/obs_measured.py); residual is the best "
                        "measured on SmolLM2 at -12 %% and -20 %%")
    b.add_argument("--obs_fisher", action="store_true",
                   help="--selection obs: weight the output error by the loss gradient's outer products at "
                        "the consumer's output (K-FAC, one backward pass; LLMPruner/obs_fisher.py)")
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
                        "MLP toward the dense MLP on the pruned inputs (LLMPruner/reconstruct.py; gradient steps "
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
                        "layer on held-out calibration tokens; refit_oneshot uses 1e-3)")
    b.add_argument("--prune_layers", type=int, default=0, help="remove this many whole decoder layers first")
    b.add_argument("--layer_importance", default="block_influence", choices=LAYER_IMPORTANCES,
                   help="how --prune_layers chooses layers")
    b.add_argument("--calibration_batch_size", type=int, default=8, help="samples per forward for statistics")


def check_beyond_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad values and combinations of those flags (``p.error``: exit 2 with the message)."""
    if args.param_budget is not None and not 0.0 <= args.param_budget < 1.0:
        p.error(f"--param_budget {args.param_budget}: must be in [0, 1)")
    if args.target_params is not None:
        if args.param_budget is not None:
            p.error(f"--target_params {args.target_params} and --param_budget {args.param_budget}: both set the "
                    "budget; give one")
        try:
            args.target_params = parse_count(args.target_params)
        except ValueError as err:
            p.error(str(err))
    if args.obs_damp <= 0:
        p.error(f"--obs_damp {args.obs_damp}: must be > 0")
    try:
        check_selection(args.selection, args.compensation)
        check_reconstruction(args.reconstruct_steps, args.reconstruct_lr, args.compensation)
    except ValueError as err:
        p.error(str(err))
    if args.obs_allocation != "uniform" and args.selection != "obs":
        p.error(f"--obs_allocation {args.obs_allocation} needs --selection obs")
    if args.obs_fisher and args.selection != "obs":
        p.error("--obs_fisher needs --selection obs")
    if args.linalg_device != "cpu" and args.compensation != "refit":
        p.error(f"--linalg_device {args.linalg_device}: only --compensation refit (its statistics, OBS selection and "
                f"solves) runs float64 linear algebra there, not --compensation {args.compensation}; drop it")


def add_expert_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture-of-experts models (LLMPruner/experts.py)")
    g.add_argument("--prune_experts", type=int, default=0,
                   help="remove this many whole experts from every MoE layer (the same count in each, so the "
                        "result is a stock checkpoint with fewer experts); nothing else is pruned")
    g.add_argument("--expert_importance", default="reap", choices=EXPERT_IMPORTANCES,
                   help="--prune_experts: which experts go: reap (router weight x output norm, averaged over the "
                        "tokens routed to the expert; REAP, 2025), frequency (how often the router chooses it) "
                        "or random")


#: flags of the width modes, with the test that says a run gave them
WIDTH_FLAGS = {
    "--pruning_ratio": lambda a: a.pruning_ratio is not None, "--block_wise": lambda a: a.block_wise,
    "--channel_wise": lambda a: a.channel_wise, "--layer_wise": lambda a: a.layer_wise,
    "--param_budget": lambda a: a.param_budget is not None, "--target_params": lambda a: a.target_params is not None,
    "--compensation": lambda a: a.compensation != "none", "--selection": lambda a: a.selection != "score",
    "--prune_layers": lambda a: a.prune_layers > 0, "--query_heads": lambda a: a.query_heads,
    "--skip_attention": lambda a: a.skip_attention, "--iterative_steps": lambda a: a.iterative_steps != 1,
    "--global_pruning": lambda a: a.global_pruning, "--reconstruct_steps": lambda a: a.reconstruct_steps > 0,
    "--offload_sequential": lambda a: a.offload_sequential,
    "--offload_states_to_disk": lambda a: a.offload_states_to_disk,
    "--save_gguf (the GGUF exporter writes dense LLaMA-family models)": lambda a: a.save_gguf,
}


def check_expert_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--prune_experts`` is a mode of its own: refuse a negative count and every width flag with it."""
    if args.prune_experts < 0:
        p.error(f"--prune_experts {args.prune_experts}: must be >= 1 (experts removed from every MoE layer)")
    if not args.prune_experts:
        return
    given = [flag for flag, test in WIDTH_FLAGS.items() if test(args)]
    if given:
        p.error(f"--prune_experts {args.prune_experts} removes whole experts and nothing else; drop "
                f"{', '.join(given)} (heads and channels of mixture-of-experts models are not pruned)")


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


def check_offload_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_memory is not None:
        try:
            parse_memory(args.max_memory)
        except ValueError as err:
            p.error(str(err))
    if args.device_map is not None:
        try:
            parse_device_map(args.device_map)
        except ValueError as err:
            p.error(str(err))
    if not args.offload:
        for flag in ("offload_states_to_disk", "offload_sequential"):
            if getattr(args, flag):
                p.error(f"--{flag} needs --offload")
        if args.max_memory is not None and args.device_map is None:
            p.error(f"--max_memory {args.max_memory} needs --offload or --device_map")
        return
    unsupported = {"--device_map": args.device_map is not None, "--layer_wise": args.layer_wise,
                   "--iterative_steps > 1": args.iterative_steps > 1, "--prune_layers": args.prune_layers > 0,
                   "--test_before_train": args.test_before_train,
                   "--save_gguf (run export.py on the saved folder)": args.save_gguf,
                   "--query_heads (not built into the layer-streamed pass)": args.query_heads,
                   "--obs_fisher (a backward pass through the whole model)": args.obs_fisher,
                   f"--obs_allocation {args.obs_allocation} (use residual, normalized or output)":
                       args.obs_allocation in ("kl", "fisher")}
    bad = [k for k, v in unsupported.items() if v]
    if args.offload_sequential and args.selection == "obs":
        p.error("--offload_sequential with --selection obs: the guard keeps the better of the sequential and "
                "the one-shot model, and OBS selection has no one-shot model; drop one of them")
    if bad:
        p.error(f"--offload cannot be combined with {', '.join(bad)} (the layer-streamed pass never holds the "
                "whole model); drop them or prune without --offload")


def needs_calibration(args: argparse.Namespace) -> bool:
    """Whether the run reads calibration text (--layer_wise keeps the first --layer layers: no data)."""
    if args.prune_experts:
        return args.expert_importance != "random"
    return (args.pruner_type in ("taylor", "fluctuation", "wanda") or args.compensation != "none"
            or args.prune_layers > 0) and not args.layer_wise
