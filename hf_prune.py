"""Prune a Hugging Face causal LM structurally (LLM-Pruner's "Discovery" and "Estimation" stages).

    python hf_prune.py --pruning_ratio 0.25 --device cpu --eval_device cpu --block_wise \
      --block_mlp_layer_start 1 --block_mlp_layer_end 4 --block_attention_layer_start 1 \
      --block_attention_layer_end 4 --save_ckpt_log_name llama_prune --pruner_type taylor \
      --taylor param_first --test_after_train --base_model ../shared/models/stories260K \
      --calibration_data ../shared/data/tinystories/tinystories_val.txt --eval_data_dir ../shared/data

Writes ``prune_log/<name>/``: command.txt, args.json, prune.log, plan.json, results.json and, with
``--save_model``, the pruned model (safetensors) and tokenizer. The run is written to a hidden sibling
and moved into place whole, replacing a previous run of that name only then: with ``--save_model`` as
soon as the model is saved (before ``--test_after_train``'s evaluation, which then cannot lose it),
otherwise at the end. A run that fails before that leaves the previous folder as it was and its own
files in ``prune_log/<name>.failed``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from LLMPruner import cli
from LLMPruner.options import ALL_PRUNERS, DTYPES, GROUPINGS, PPL_DATASETS, TAYLOR_MODES
from LLMPruner.prune_args import (add_beyond_args, add_expert_args, add_offload_args, apply_sources,
                                  check_run_flags, explicit_flags, needs_calibration)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    a = p.add_argument
    a("--base_model", default="huggyllama/llama-7b", help="HF id or local folder (plain, pruned or Meta layout)")
    a("--save_ckpt_log_name", default="llama_prune", help="name of the folder under --log_dir")
    a("--log_dir", default="prune_log", help="where the run's folder is created")
    a("--pruning_ratio", type=float, default=None,
      help="fraction of heads/channels removed in each pruned layer (default 0.5)")
    a("--pruner_type", default="l2", choices=ALL_PRUNERS,
      help="importance estimator (fluctuation: FLAP, wanda: |W|*||x||; both forward-only)")
    a("--taylor", default="param_first", choices=TAYLOR_MODES, help="Taylor variant (with --pruner_type taylor)")
    a("--grouping_strategy", default="sum", choices=GROUPINGS, help="how a group's members' scores combine")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--block_wise", action="store_true", help="prune heads and MLP channels in layer ranges")
    mode.add_argument("--channel_wise", action="store_true", help="prune the hidden size, model-wide")
    mode.add_argument("--layer_wise", action="store_true", help="keep only the first --layer decoder layers")
    a("--layer", type=int, default=12, help="decoder layers kept by --layer_wise")
    a("--block_attention_layer_start", type=int, default=3, help="first layer whose heads are pruned")
    a("--block_attention_layer_end", type=int, default=None, help="end (exclusive); default: last layer")
    a("--block_mlp_layer_start", type=int, default=3, help="first layer whose MLP channels are pruned")
    a("--block_mlp_layer_end", type=int, default=None, help="end (exclusive); default: last layer")
    a("--iterative_steps", type=int, default=1, help="prune in this many steps, re-estimating each time")
    a("--global_pruning", action="store_true", help="rank units of each kind across all pruned layers")
    a("--round_to", type=int, default=1, help="round kept MLP/hidden channels to a multiple of this")
    add_beyond_args(p)
    a("--num_examples", type=int, default=10, help="calibration samples (Taylor, statistics, depth)")
    a("--calibration_data", default="bookcorpus",
      help="calibration text: 'bookcorpus' (Hub), another dataset name, or a local .txt/.jsonl/.json file")
    a("--calibration_seq_len", type=int, default=64, help="tokens per calibration sample")
    a("--device", default=None, help="device for pruning (default: cuda if available, else cpu)")
    a("--eval_device", default=None, help="device for perplexity and generation (default: cuda if available, else cpu)")
    a("--dtype", default="float32", choices=DTYPES, help="weights' dtype while pruning")
    a("--test_before_train", action="store_true", help="perplexity of the dense model first")
    a("--test_after_train", action="store_true", help="sample generations and perplexity after pruning")
    a("--ppl_datasets", default="wikitext2,ptb", help="comma-separated datasets (or text files) for perplexity")
    a("--eval_data_dir", default=None,
      help="local folder with wikitext2/wiki.test.raw and ptb/ptb.valid.txt (default: the Hub)")
    a("--eval_batch_size", type=int, default=4, help="windows per perplexity batch")
    a("--max_seq_len", type=int, default=128, help="perplexity window and generation length")
    a("--temperature", type=float, default=1.0, help="sampling temperature for the sample generations")
    a("--top_p", type=float, default=0.95, help="nucleus sampling for the sample generations")
    a("--text_only", action="store_true",
      help="--base_model is an image-text model (Gemma-3 4B-27B, Mistral Small 3.x): prune its language model "
           "alone; the vision tower and projector are dropped and the result is a text-only checkpoint")
    a("--allow_pickle", action="store_true",
      help="let --base_model be a reference LLM-Pruner pickle (pytorch_model.bin): this RUNS PICKLED CODE; "
           "only for files you trust (the model is converted to safetensors on --save_model)")
    a("--save_model", action="store_true", help="write the pruned model and tokenizer to the run's folder")
    a("--save_gguf", action="store_true",
      help="also write the pruned model as <run folder>/model.gguf for llama.cpp (per-layer shapes included)")
    a("--gguf_outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="tensor type of --save_gguf")
    a("--seed", type=int, default=42, help="random seed")
    add_expert_args(p)
    add_offload_args(p)
    g = p.add_argument_group("recipes and configurations (LLMPruner/config.py, LLMPruner/recipes/)")
    g.add_argument("--recipe", default=None,
                   help="a measured setting: quality, fast, reference, quality+reconstruct (--list_recipes shows "
                        "their figures), auto (prune with each, keep the lowest held-out loss), or a recipe "
                        "file; it sets the flags it names, except those given on this command line")
    g.add_argument("--config", default=None,
                   help="a configuration file (an earlier run's prune_config.json, or YAML): its settings, except the "
                        "flags given on this command line")
    g.add_argument("--list_recipes", action="store_true", help="print the recipes and their measured figures")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if args.list_recipes:
        from LLMPruner.recipe import recipe_table
        print(recipe_table())
        p.exit(0)
    try:  # the pruning options are checked in one place: PruneConfig.validate (one line naming the flag)
        apply_sources(args, explicit_flags(p, argv))
        check_run_flags(args)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    if args.pruning_ratio is None and not args.prune_experts:
        args.pruning_ratio = 0.5
    if not (args.block_wise or args.channel_wise or args.layer_wise or args.prune_experts):
        args.block_wise = True  # the paper's main mode
    check_inputs(args)
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Flags that name devices, sizes, files and Hub names, checked before anything loads."""
    args.device = args.device or cli.default_device()
    args.eval_device = args.eval_device or cli.default_device()
    cli.check_device("--device", args.device)
    cli.check_device("--eval_device", args.eval_device)
    if args.linalg_device == "auto":
        args.linalg_device = args.device
    cli.check_device("--linalg_device", args.linalg_device)
    for flag in ("max_seq_len", "calibration_seq_len", "eval_batch_size", "calibration_batch_size",
                 "iterative_steps"):
        cli.check_min(f"--{flag}", getattr(args, flag), 1)
    cli.check_min("--prune_layers", args.prune_layers, 0)
    cli.check_source("--base_model", args.base_model, "model", "--base_model ../shared/models/stories260K")
    if needs_calibration(args):
        cli.check_source("--calibration_data", args.calibration_data, "dataset",
                         "--calibration_data ../shared/data/c4/c4_demo.jsonl (a .txt/.jsonl/.json file)")
        if Path(args.calibration_data).is_file() and not _has_text(Path(args.calibration_data)):
            raise cli.UsageError(f"--calibration_data {args.calibration_data!r}: the file holds no text; give a "
                                 ".txt/.jsonl/.json file with the calibration documents")
    if args.eval_data_dir is not None and not Path(args.eval_data_dir).is_dir():
        raise cli.UsageError(f"--eval_data_dir {args.eval_data_dir!r}: no such folder (expected one holding "
                             "wikitext2/wiki.test.raw and ptb/ptb.valid.txt)")
    if args.test_before_train or args.test_after_train:
        for name in filter(None, args.ppl_datasets.split(",")):
            if name in PPL_DATASETS and args.eval_data_dir is None:
                cli.check_source("--ppl_datasets", name, "dataset", "--eval_data_dir ../shared/data",
                                 hub_name=PPL_DATASETS[name][1])
            elif name not in PPL_DATASETS and not Path(name).is_file():
                raise cli.UsageError(f"--ppl_datasets {name!r}: neither {sorted(PPL_DATASETS)} nor a text file")
    cli.check_writable_dir("--log_dir", args.log_dir)


def _has_text(path: Path) -> bool:
    """Whether ``path`` holds anything but white space (read line by line: stops at the first text)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


def main(argv=None) -> int:
    args = parse_args(argv)  # every flag checked before torch and transformers are imported
    from LLMPruner.prune_run import run
    return run(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cli.run(main, "hf_prune.py")
