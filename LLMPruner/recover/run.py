"""The run of ``post_training.py`` once its arguments are parsed and checked: load the pruned model, build
the data, train LoRA (or all weights, with distillation from the dense model), save the adapter, merge,
report."""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from LLMPruner.adapters import get_adapter
from LLMPruner.checkpoint import load_model
from LLMPruner.evaluate.ppl import evaluate_ppl
from LLMPruner.recover import (RecoveryConfig, build_instruction_datasets, build_text_eval_dataset, build_trainer, default_dtype,
               last_complete_checkpoint, merge_adapter, reporting_disk_full, save_merged)
from LLMPruner.recover.distill import DistillConfig, distill_trainer_class
from LLMPruner.recover.packing import build_packed_datasets

logger = logging.getLogger("post_training")


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


def run(args: argparse.Namespace) -> dict:
    """post_training.py after its arguments are parsed and checked."""
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
                  train_runtime_s=result.metrics.get("train_runtime"),
                  log_history=trainer.state.log_history)  # the loss curve (KL and CE with distillation)

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
