"""The reference's ``test_speedup.py`` entry point: parameters, MACs and memory of one model.

    python test_speedup.py --model_type pretrain --base_model ../shared/models/stories260K
    python test_speedup.py --model_type pruneLLM --ckpt prune_log/llama_prune          # our folder
    python test_speedup.py --model_type pruneLLM --ckpt prune_log/x/pytorch_model.bin --allow_pickle

A thin front end of ``LLMPruner.evaluate.stats`` (what ``evaluate.py`` reports per checkpoint), with
the reference's flags and its 64-token input. MACs are counted from the module shapes (see
``LLMPruner/evaluate/stats.py``), not with ptflops; add ``--latency`` for timings.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from LLMPruner import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model_type", choices=cli.MODEL_TYPES, default=None,
                   help="pretrain: --base_model; pruneLLM: --ckpt; tune_prune_LLM: --ckpt + --lora_ckpt")
    p.add_argument("--base_model", default=None, help="the model of --model_type pretrain")
    p.add_argument("--ckpt", default=None, help="pruned model (folder, or the reference's pytorch_model.bin)")
    p.add_argument("--lora_ckpt", default=None, help="peft adapter folder (merged before counting)")
    p.add_argument("--model", default=None, help="instead of --model_type: any model folder or id")
    p.add_argument("--seq_len", type=int, default=64, help="tokens of the input (the reference: 64)")
    p.add_argument("--latency", action="store_true", help="also time forward passes and generation")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["float32", "float16", "bfloat16", "auto"],
                   help="auto: the checkpoint's dtype (the reference: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    p.add_argument("--allow_pickle", action="store_true",
                   help="let --ckpt be a reference LLM-Pruner pickle: this RUNS PICKLED CODE; only for "
                        "files you trust")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    args.model, args.lora, flag = cli.reference_model(args)
    args.device = cli.check_device("--device", args.device or cli.default_device())
    cli.check_min("--seq_len", args.seq_len, 1)
    cli.check_source(flag, args.model, "model", f"{flag} ../shared/models/stories260K")
    if args.lora is not None and not os.path.isdir(args.lora):
        raise cli.UsageError(f"--lora_ckpt {args.lora!r}: no such adapter folder")
    if args.json is not None:
        cli.check_writable_dir("--json", os.path.dirname(os.path.abspath(args.json)))
    return args


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)  # every flag checked before torch and transformers are imported
    from LLMPruner.evaluate.models import CheckpointSpec, load_for_eval
    from LLMPruner.evaluate.stats import model_statistics
    spec = CheckpointSpec(name="model", model=args.model, lora=args.lora)
    model, _ = load_for_eval(spec, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    stats = model_statistics(model, args.seq_len, latency=args.latency)
    print("{:<30}  {:<8}".format("Computational complexity: ", f"{stats['macs_total'] / 1e9:.4f} GMac"))
    print("{:<30}  {:<8}".format("Number of parameters: ", f"{stats['params'] / 1e6:.4f} M"))
    print("{:<30}  {:<8}".format("Model size: ", f"{stats['model_mb']:.2f} MiB"))
    if "peak_forward_mb" in stats:
        print(f"GPU Memory Requirement: {stats['peak_forward_mb']:.2f} MiB")
    if args.latency:
        print(f"Forward: {stats['forward_ms']:.2f} ms; generation: {stats['generate_tokens_per_s']:.1f} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2)
    return stats


if __name__ == "__main__":
    cli.run(main, "test_speedup.py")
