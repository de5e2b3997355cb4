"""Evaluate checkpoints (base, pruned, pruned+LoRA): perplexity, zero-shot accuracy, efficiency statistics.

    python evaluate.py --checkpoints base=path/to/llama pruned=out/pruned lora200=out/pruned+out/tune/checkpoint-200 \
        --ppl wikitext2 ptb --data_dir ../shared/data --tasks piqa,arc_easy --zeroshot_dir ../shared/data/zeroshot \
        --limit 200 --output_dir results/

writes results/results.json (everything) and results/results.md (one table).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

from LLMPruner import cli
from LLMPruner.evaluate.models import parse_spec
from LLMPruner.options import PAPER_TASKS, PPL_DATASETS, PROTOCOLS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, help="NAME=MODEL[+LORA_DIR] ...")
    p.add_argument("--ppl", nargs="*", default=["wikitext2", "ptb"], help="wikitext2, ptb or text files")
    p.add_argument("--data_dir", default=None, help="local folder with wikitext2/ and ptb/ (offline)")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--ppl_protocol", choices=PROTOCOLS, default="reference")
    p.add_argument("--ppl_stride", type=int, default=None, help="sliding protocol stride (default seq/2)")
    p.add_argument("--ppl_windows", type=int, default=None,
                   help="reference protocol: the first N windows only (bench/smollm2.py's tables: 160)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated lm-eval tasks, or '' (default: {','.join(PAPER_TASKS)} when lm-eval "
                        "is installed, else none: perplexity only)")
    p.add_argument("--zeroshot_dir", default=None, help="local task files (see docs/evaluation.md)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--zeroshot_max_length", type=int, default=None,
                   help="context lm-eval allows (default: the model config's); raise it when a small "
                        "model's answers exceed it")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--no_stats", action="store_true", help="skip parameters/MACs/latency")
    p.add_argument("--no_latency", action="store_true", help="count parameters/MACs only")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--output_dir", default="results", help="where results.json and results.md are written")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --output_dir")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--allow_pickle", action="store_true",
                   help="let a checkpoint be a reference LLM-Pruner pickle (pytorch_model.bin): this RUNS "
                        "PICKLED CODE; only for files you trust")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    check_inputs(args)
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Flags checked before any model loads (the task names are checked in main, which needs lm-eval)."""
    args.device = cli.check_device("--device", args.device or cli.default_device())
    for flag in ("max_seq_len", "limit", "batch_size", "ppl_stride", "zeroshot_max_length", "ppl_windows"):
        cli.check_min(f"--{flag}", getattr(args, flag), 1)
    if args.tasks is None:
        lm_eval = importlib.util.find_spec("lm_eval") is not None
        args.tasks = ",".join(PAPER_TASKS) if lm_eval else ""
        if not lm_eval:
            logging.getLogger("evaluate").warning(
                "lm-eval is not installed: perplexity and statistics only (pip install -e .[eval] for the "
                "zero-shot tasks)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks:
        from LLMPruner.evaluate.zeroshot import check_tasks
        check_tasks(tasks)  # "unknown task 'x'. Did you mean ...?" (lm-eval's index: ~10 s, once)
    seen: dict[str, str] = {}
    for text in args.checkpoints:
        spec = parse_spec(text)
        if spec.name in seen:
            raise cli.UsageError(f"--checkpoints: {seen[spec.name]!r} and {text!r} are both named {spec.name!r}; "
                                 "give each a distinct NAME= (e.g. base=... pruned=...)")
        seen[spec.name] = text
        cli.check_source("--checkpoints", spec.model, "model", "--checkpoints base=../shared/models/stories260K")
    for folder, flag in ((args.data_dir, "--data_dir"), (args.zeroshot_dir, "--zeroshot_dir")):
        if folder is not None and not Path(folder).is_dir():
            raise cli.UsageError(f"{flag} {folder!r}: no such folder")
    for name in args.ppl:
        if name in PPL_DATASETS and args.data_dir is None:
            cli.check_source("--ppl", name, "dataset", "--data_dir ../shared/data",
                             hub_name=PPL_DATASETS[name][1])
        elif name not in PPL_DATASETS and not Path(name).is_file():
            raise cli.UsageError(f"--ppl {name!r}: neither {sorted(PPL_DATASETS)} nor a text file")
    if tasks and args.zeroshot_dir is None and not cli.hub_reachable():
        raise cli.UsageError(f"--tasks {args.tasks}: lm-eval downloads these from the Hugging Face Hub, which is "
                             "unreachable; pass --zeroshot_dir ../shared/data/zeroshot (local task files) or "
                             "--tasks ''")
    earlier = [n for n in ("results.json", "results.md") if (Path(args.output_dir) / n).exists()]
    if earlier and not args.overwrite:
        raise cli.UsageError(f"--output_dir {args.output_dir!r}: holds {' and '.join(earlier)} of an earlier run; "
                             "choose another folder or pass --overwrite to replace them")
    cli.check_writable_dir("--output_dir", args.output_dir)


def evaluate_one(model, tokenizer, args: argparse.Namespace, tasks: list[str]) -> dict:
    from LLMPruner.evaluate.ppl import evaluate_ppl
    from LLMPruner.evaluate.stats import model_statistics
    from LLMPruner.evaluate.zeroshot import average, evaluate_zeroshot
    row: dict = {}
    if args.ppl:
        row["ppl"] = evaluate_ppl(model, tokenizer, args.ppl, args.max_seq_len, args.batch_size,
                                  args.data_dir, args.device, protocol=args.ppl_protocol, stride=args.ppl_stride,
                                  max_windows=args.ppl_windows)
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
    args = parse_args(argv)  # every flag checked before torch and transformers are imported
    import torch

    from LLMPruner.evaluate.models import load_for_eval
    from LLMPruner.evaluate.report import markdown_table, write_report
    torch.manual_seed(args.seed)
    # 1. everything cheap was checked by parse_args, before loading any model
    specs = [parse_spec(s) for s in args.checkpoints]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    # 2. evaluate each checkpoint in turn
    results = {}
    for spec in specs:
        model, tokenizer = load_for_eval(spec, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
        results[spec.name] = {"model": spec.model, "lora": spec.lora, **evaluate_one(model, tokenizer, args, tasks)}
        del model
    # 3. one table
    json_path, md_path = write_report(results, args.output_dir)
    print(markdown_table(results))
    print(f"wrote {json_path} and {md_path}")
    return results


if __name__ == "__main__":
    cli.run(main, "evaluate.py")
