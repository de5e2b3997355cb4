"""Evaluate checkpoints (base, pruned, pruned+LoRA): perplexity, zero-shot accuracy, efficiency statistics.

    python evaluate.py --checkpoints base=path/to/llama pruned=out/pruned lora200=out/pruned+out/tune/checkpoint-200 \
        --ppl wikitext2 ptb --data_dir ../shared/data --tasks piqa,arc_easy --zeroshot_dir ../shared/data/zeroshot \
        --limit 200 --output_dir results/

writes results/results.json (everything) and results/results.md (one table).
"""
from __future__ import annotations

import argparse
import logging

import torch

from LLMPruner.evaluate.models import load_for_eval, parse_spec
from LLMPruner.evaluate.ppl import PROTOCOLS, evaluate_ppl
from LLMPruner.evaluate.report import markdown_table, write_report
from LLMPruner.evaluate.stats import model_statistics
from LLMPruner.evaluate.zeroshot import PAPER_TASKS, average, check_tasks, evaluate_zeroshot


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, help="NAME=MODEL[+LORA_DIR] ...")
    p.add_argument("--ppl", nargs="*", default=["wikitext2", "ptb"], help="wikitext2, ptb or text files")
    p.add_argument("--data_dir", default=None, help="local folder with wikitext2/ and ptb/ (offline)")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--ppl_protocol", choices=PROTOCOLS, default="reference")
    p.add_argument("--ppl_stride", type=int, default=None, help="sliding protocol stride (default seq/2)")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated lm-eval tasks, or ''")
    p.add_argument("--zeroshot_dir", default=None, help="local task files (see docs/evaluation.md)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--zeroshot_max_length", type=int, default=None,
                   help="context lm-eval allows (default: the model config's); raise it when a small "
                        "model's answers exceed it")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--no_stats", action="store_true", help="skip parameters/MACs/latency")
    p.add_argument("--no_latency", action="store_true", help="count parameters/MACs only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--output_dir", default="results")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def evaluate_one(model, tokenizer, args: argparse.Namespace, tasks: list[str]) -> dict:
    row: dict = {}
    if args.ppl:
        row["ppl"] = evaluate_ppl(model, tokenizer, args.ppl, args.max_seq_len, args.batch_size,
                                  args.data_dir, args.device, protocol=args.ppl_protocol, stride=args.ppl_stride)
    if tasks:
        row["zeroshot"] = evaluate_zeroshot(model, tokenizer, tasks, data_dir=args.zeroshot_dir,
                                            limit=args.limit, batch_size=args.batch_size,
                                            device=args.device, max_length=args.zeroshot_max_length,
                                            seed=args.seed)
        row["average"] = average(row["zeroshot"])
    if not args.no_stats:
        row["stats"] = model_statistics(model, args.max_seq_len, latency=not args.no_latency)
    return row


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    # 1. check everything cheap before loading any model
    specs = [parse_spec(s) for s in args.checkpoints]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks:
        check_tasks(tasks)
    # 2. evaluate each checkpoint in turn
    results = {}
    for spec in specs:
        model, tokenizer = load_for_eval(spec, device=args.device, dtype=args.dtype)
        results[spec.name] = {"model": spec.model, "lora": spec.lora, **evaluate_one(model, tokenizer, args, tasks)}
        del model
    # 3. one table
    json_path, md_path = write_report(results, args.output_dir)
    print(markdown_table(results))
    print(f"wrote {json_path} and {md_path}")
    return results


if __name__ == "__main__":
    main()
