"""Recover a pruned model with LoRA (LLM-Pruner's "Step Two"), then optionally merge the adapter.

    python post_training.py --prune_model prune_log/llama_0.2 --data_path yahma/alpaca-cleaned \
        --output_dir tune_log/llama_0.2 --num_epochs 2 --learning_rate 1e-4 --merge
    torchrun --nproc_per_node 4 post_training.py ...        # data parallel (also: accelerate launch)
    python post_training.py --prune_model prune_log/x --merge_adapter tune_log/x/adapter --output_dir out

Writes OUTPUT_DIR/checkpoint-N (peft adapter + optimizer/scheduler/RNG state), OUTPUT_DIR/adapter (the
final, best-by-validation-loss adapter) and, with --merge, OUTPUT_DIR/merged (a pruned checkpoint).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from LLMPruner import cli
from LLMPruner.options import PPL_DATASETS
from LLMPruner.recover.distill_cli import add_distill_arguments, check_distill_args

logger = logging.getLogger("post_training")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--prune_model", required=True, help="pruned folder from hf_prune.py, or any HF model id/folder")
    p.add_argument("--data_path", default="yahma/alpaca-cleaned",
                   help="HF dataset name, local .json/.jsonl (Alpaca: instruction/input/output; LaMini: "
                        "instruction/response; or text) or .txt (blank-line separated documents, no template)")
    p.add_argument("--output_dir", default="tune_log/recover", help="checkpoints, adapter/, merged/")
    p.add_argument("--batch_size", type=int, default=128, help="examples per optimizer step (all processes)")
    p.add_argument("--micro_batch_size", type=int, default=4, help="examples per forward pass per process")
    p.add_argument("--num_epochs", type=float, default=5, help="passes over the training data")
    p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup_steps", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--cutoff_len", type=int, default=256, help="truncate prompt+answer to this many tokens")
    p.add_argument("--val_set_size", type=int, default=2000, help="examples held out for validation (0: none)")
    p.add_argument("--prompt_template_name", default="alpaca", help="alpaca, alpaca_short, vicuna, or a .json")
    p.add_argument("--no_instruction", action="store_true", help="no template: instruction, input, answer as is")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling numerator (scale = alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--lora_target_modules", default=None,
                   help="comma-separated module names (default: every linear projection of the architecture)")
    p.add_argument("--train_on_inputs", action="store_true", help="also train on the prompt tokens")
    p.add_argument("--add_eos_token", action=argparse.BooleanOptionalAction, default=False,
                   help="append EOS to each example when it fits in --cutoff_len (off, as in the reference)")
    p.add_argument("--group_by_length", action="store_true", help="batch examples of similar length")
    p.add_argument("--extra_val_dataset", default=None,
                   help="comma-separated wikitext2,ptb or text files; their loss is logged at each evaluation")
    p.add_argument("--extra_val_max_windows", type=int, default=None, help="cap on --extra_val_dataset windows")
    p.add_argument("--data_dir", default=None, help="local folder holding wikitext2/ and ptb/ (offline)")
    p.add_argument("--cache_dataset", action="store_true", help="cache the tokenized data under --cache_dir")
    p.add_argument("--cache_dir", default="cache/recover_data", help="where --cache_dataset writes")
    p.add_argument("--eval_steps", type=int, default=200, help="evaluate every N optimizer steps")
    p.add_argument("--save_steps", type=int, default=200, help="checkpoint every N optimizer steps")
    p.add_argument("--save_total_limit", type=int, default=2, help="checkpoints kept (the best is always kept)")
    p.add_argument("--logging_steps", type=int, default=10, help="log the training loss every N steps")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N folder, or 'last' for the newest in --output_dir")
    p.add_argument("--wandb_project", default=None, help="log to Weights & Biases under this project")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="training precision (default: bf16 on capable GPUs, fp16 on older ones, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=42, help="seed for data split, order, dropout and LoRA init")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (passed to TrainingArguments)")
    p.add_argument("--fsdp", default="", help="FSDP options, e.g. 'full_shard auto_wrap' (TrainingArguments)")
    p.add_argument("--fsdp_config", default=None, help="FSDP JSON config (TrainingArguments)")
    p.add_argument("--merge", action="store_true", help="after training, write OUTPUT_DIR/merged")
    p.add_argument("--merge_adapter", default=None,
                   help="no training: merge this adapter folder into --prune_model, write OUTPUT_DIR/merged")
    p.add_argument("--eval_ppl", default=None,
                   help="comma-separated wikitext2,ptb or text files: perplexity before and after")
    p.add_argument("--eval_seq_len", type=int, default=128, help="window length for --eval_ppl")
    p.add_argument("--allow_pickle", action="store_true",
                   help="let --prune_model be a reference LLM-Pruner pickle (prune_log/X/pytorch_model.bin): "
                        "this RUNS PICKLED CODE; only for files you trust")
    add_distill_arguments(p)
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    check_distill_args(p, args)
    check_inputs(args)
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Devices, sizes, files and Hub names, checked before the model loads."""
    args.device = cli.check_device("--device", args.device or cli.default_device())
    if args.num_epochs <= 0 and args.max_steps <= 0 and not args.merge_adapter:
        raise cli.UsageError(f"--num_epochs {args.num_epochs}: must be > 0 (or give --max_steps N > 0)")
    if args.max_steps == 0 or args.max_steps < -1:
        raise cli.UsageError(f"--max_steps {args.max_steps}: must be > 0, or -1 to train for --num_epochs")
    for flag in ("batch_size", "micro_batch_size", "cutoff_len", "lora_r", "eval_steps", "save_steps",
                 "logging_steps", "eval_seq_len", "save_total_limit"):
        cli.check_min(f"--{flag}", getattr(args, flag), 1)
    for flag in ("val_set_size", "warmup_steps"):
        cli.check_min(f"--{flag}", getattr(args, flag), 0)
    cli.check_min("--extra_val_max_windows", args.extra_val_max_windows, 1)
    cli.check_source("--prune_model", args.prune_model, "model", "--prune_model prune_log/NAME (hf_prune.py's folder)")
    if args.merge_adapter is not None:
        if not Path(args.merge_adapter).is_dir():
            raise cli.UsageError(f"--merge_adapter {args.merge_adapter!r}: no such adapter folder")
    elif args.distill_on == "instruction" and not looks_local_data(args.data_path):
        cli.check_source("--data_path", args.data_path, "dataset",
                         "--data_path ../shared/data/alpaca/alpaca_5000.json (Alpaca-schema .json/.jsonl or .txt)")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise cli.UsageError(f"--data_dir {args.data_dir!r}: no such folder (expected wikitext2/ and ptb/ in it)")
    for flag in ("extra_val_dataset", "eval_ppl"):
        for name in filter(None, (getattr(args, flag) or "").split(",")):
            if name in PPL_DATASETS and args.data_dir is None:
                cli.check_source(f"--{flag}", name, "dataset", "--data_dir ../shared/data",
                                 hub_name=PPL_DATASETS[name][1])
            elif name not in PPL_DATASETS and not Path(name).is_file():
                raise cli.UsageError(f"--{flag} {name!r}: neither {sorted(PPL_DATASETS)} nor a text file")
    if args.teacher:
        cli.check_source("--teacher", args.teacher, "model", "--teacher ../shared/models/stories260K (the dense model)")
    cli.check_writable_dir("--output_dir", args.output_dir)


def looks_local_data(path: str) -> bool:
    """What ``load_instruction_records`` reads as a file (its own errors name a missing or bad one)."""
    return Path(path).suffix in (".json", ".jsonl", ".txt") or Path(path).exists()


def main(argv=None) -> dict:
    args = parse_args(argv)  # every flag checked before torch and transformers are imported
    from LLMPruner.recover.run import run
    return run(args)


if __name__ == "__main__":
    cli.run(main, "post_training.py")
