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
import json
import logging
import os
from pathlib import Path

import torch

from LLMPruner import cli
from LLMPruner.adapters import get_adapter
from LLMPruner.checkpoint import load_model
from LLMPruner.evaluate.ppl import PPL_DATASETS, evaluate_ppl
from LLMPruner.recover import (RecoveryConfig, build_instruction_datasets, build_text_eval_dataset,
                               build_trainer, default_dtype, last_complete_checkpoint, merge_adapter,
                               reporting_disk_full, save_merged)
from LLMPruner.recover.distill import DistillConfig, distill_trainer_class
from LLMPruner.recover.distill_cli import add_distill_arguments, check_distill_args
from LLMPruner.recover.packing import build_packed_datasets

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
    p.add_argument("--device", default=cli.default_device(), help="cuda or cpu (default: cuda if available)")
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
    cli.check_device("--device", args.device)
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


def recovery_config(args: argparse.Namespace, target_modules: list[str]) -> RecoveryConfig:
    return RecoveryConfig(
        output_dir=args.output_dir, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        num_epochs=args.num_epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_target_modules=target_modules, group_by_length=args.group_by_length,
        eval_steps=args.eval_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, dtype=args.dtype or default_dtype(args.device), seed=args.seed,
        report_to=["wandb"] if args.wandb_project else [], deepspeed=args.deepspeed, fsdp=args.fsdp,
        fsdp_config=args.fsdp_config, use_cpu=args.device == "cpu", train_mode=args.train_mode)


def distill_trainer(args: argparse.Namespace, dtype: torch.dtype):
    """The distillation Trainer class (teacher loaded on the CPU), or None without --distill_loss."""
    if args.distill_loss == "none":
        return None
    # an image-text teacher (a Gemma-3 / Mistral Small 3.x pruned with --text_only) teaches with its language model
    teacher, _ = load_model(args.teacher, device="cpu", dtype=dtype, text_only=True)
    return distill_trainer_class(teacher, DistillConfig(
        loss=args.distill_loss, alpha=args.kd_alpha, temperature=args.kd_temperature,
        chunk_tokens=args.kd_chunk_tokens, teacher_device=args.teacher_device))


def save_full(model, tokenizer, args: argparse.Namespace, dtype: torch.dtype):
    """--train_mode full: the trained weights, as a pruned checkpoint in OUTPUT_DIR/merged."""
    from LLMPruner.checkpoint import save_pruned
    model = model.to(dtype)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = None  # a pad id set for training is no generation default
    provenance = {"base_model": args.teacher, "recovered_from": args.prune_model, "train_mode": "full",
                  "distill_loss": args.distill_loss}
    return save_pruned(model, tokenizer, os.path.join(args.output_dir, "merged"), provenance)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge_adapter:
        return {"merged": str(merge_adapter(args.prune_model, args.merge_adapter,
                                            os.path.join(args.output_dir, "merged"),
                                            allow_pickle=args.allow_pickle))}
    if args.wandb_project:
        os.environ["WANDB_PROJECT"] = args.wandb_project
    from transformers import set_seed
    set_seed(args.seed)

    # 1. the (pruned) model, in the training dtype; the Trainer places it on the device
    dtype = args.dtype or default_dtype(args.device)
    load_dtype = torch.float32 if dtype == "fp32" else {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # full training keeps fp32 master weights (bf16/fp16 through autocast); the teacher keeps load_dtype
    model, tokenizer = load_model(args.prune_model, device="cpu", allow_pickle=args.allow_pickle,
                                  dtype=torch.float32 if args.train_mode == "full" else load_dtype)
    targets = args.lora_target_modules.split(",") if args.lora_target_modules else \
        list(get_adapter(model).lora_target_modules)

    # 2. data: tokenized instruction examples or packed text blocks (+ language-modelling validation sets)
    if args.distill_on != "instruction":
        train, val = build_packed_datasets(args.distill_on, tokenizer, args.cutoff_len, args.val_set_size,
                                           seed=args.seed, add_eos=args.add_eos_token)
    else:
        train, val = build_instruction_datasets(
            args.data_path, tokenizer, cutoff_len=args.cutoff_len, val_set_size=args.val_set_size,
            prompt_template_name=None if args.no_instruction else args.prompt_template_name,
            train_on_inputs=args.train_on_inputs, add_eos_token=args.add_eos_token, seed=args.seed,
            cache_dir=args.cache_dir if args.cache_dataset else None)
    evals = {"instruct": val} if val is not None else {}
    for name in filter(None, (args.extra_val_dataset or "").split(",")):
        key = os.path.splitext(os.path.basename(name))[0]
        evals[key] = build_text_eval_dataset(name, tokenizer, args.cutoff_len, args.data_dir,
                                             args.extra_val_max_windows)
    ppl_sets = list(filter(None, (args.eval_ppl or "").split(",")))
    report: dict = {"ppl_before": evaluate_ppl(model, tokenizer, ppl_sets, args.eval_seq_len,
                                               data_dir=args.data_dir) if ppl_sets and rank == 0 else {}}

    # 3. LoRA (or full weights) + Trainer (+ the teacher with --distill_loss)
    trainer = build_trainer(model, tokenizer, train, evals, recovery_config(args, targets),
                            trainer_class=distill_trainer(args, load_dtype))
    resume = args.resume_from_checkpoint
    if resume == "last":  # the newest *complete* checkpoint-N (Trainer's own pick may be a truncated one)
        resume = last_complete_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    report.update(train_loss=result.training_loss, global_step=trainer.state.global_step,
                  best_checkpoint=trainer.state.best_model_checkpoint,
                  train_runtime_s=result.metrics.get("train_runtime"))

    # 4. adapter (best by validation loss when there is one), merged model, report
    if trainer.is_world_process_zero():
        if args.train_mode == "lora":
            with reporting_disk_full(os.path.join(args.output_dir, "adapter")):
                trainer.model.save_pretrained(os.path.join(args.output_dir, "adapter"))
                tokenizer.save_pretrained(os.path.join(args.output_dir, "adapter"))
        peft_model = trainer.model.float()
        if ppl_sets:
            report["ppl_after"] = evaluate_ppl(peft_model, tokenizer, ppl_sets, args.eval_seq_len,
                                               data_dir=args.data_dir)
        if args.train_mode == "full":
            with reporting_disk_full(args.output_dir):
                report["merged"] = str(save_full(peft_model, tokenizer, args, load_dtype))
        elif args.merge:
            with reporting_disk_full(os.path.join(args.output_dir, "merged")):
                report["merged"] = str(save_merged(peft_model, tokenizer, os.path.join(args.output_dir, "merged"),
                                                   dtype=load_dtype))  # merged in fp32, saved in the model's dtype
        with reporting_disk_full(args.output_dir), \
                open(os.path.join(args.output_dir, "recovery_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        logger.info("done: %s", json.dumps(report))
    return report


if __name__ == "__main__":
    cli.run(main, "post_training.py")
