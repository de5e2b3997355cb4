"""LoRA recovery with peft and transformers' ``Trainer`` (single process, torchrun, accelerate launch).

``RecoveryConfig`` holds the hyper-parameters (the reference's names); ``build_trainer`` wraps the model
in LoRA and returns a ``Trainer`` whose checkpoints are peft adapter folders plus optimizer/scheduler/RNG
state (what ``resume_from_checkpoint`` needs). Data parallelism, DeepSpeed and FSDP come from the
launcher and ``TrainingArguments``; gradient accumulation is derived from batch / micro-batch / world size.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from LLMPruner.recover.data import IGNORE_INDEX

logger = logging.getLogger(__name__)

DType = Literal["bf16", "fp16", "fp32"]
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


class DiskFullError(OSError):
    """A write failed because the disk is full; the message names the folder and the free bytes."""


#: what every resumable checkpoint-N holds; ``trainer_state.json`` is the Trainer's last write
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # DeepSpeed/FSDP: global_step*/ or optimizer_0/ folders
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` (a Trainer ``checkpoint-N``) cannot be resumed from, or None when it is complete."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"trainer_state.json is truncated or corrupt ({err})"
    adapters = [folder / n for n in ADAPTER_FILES if (folder / n).is_file()]
    if not adapters:
        return f"no adapter weights (one of {', '.join(ADAPTER_FILES)})"
    if any(a.stat().st_size == 0 for a in adapters):
        return f"{adapters[0].name} is empty"
    sharded = any(folder.glob("global_step*")) or any(folder.glob("optimizer_0*"))
    optimizer = [folder / n for n in OPTIMIZER_FILES if (folder / n).is_file()]
    if not optimizer and not sharded:
        return f"no optimizer state ({' or '.join(OPTIMIZER_FILES)})"
    if any(o.stat().st_size == 0 for o in optimizer):
        return f"{optimizer[0].name} is empty"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (``--resume_from_checkpoint last``).

    Newer folders that an interrupted or disk-full write left incomplete are skipped, each logged with
    what it lacks; an error lists them when no complete checkpoint exists.
    """
    output_dir = Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in (output_dir.iterdir() if output_dir.is_dir() else [])
                   if p.is_dir() and (m := _CHECKPOINT.match(p.name)))
    skipped = []
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                logger.warning("resuming from %s, the newest complete checkpoint", folder)
            return str(folder)
        logger.warning("skipping %s: incomplete (%s): an interrupted or disk-full write?", folder, problem)
        skipped.append(f"{folder.name} ({problem})")
    raise FileNotFoundError(f"--resume_from_checkpoint last: no complete checkpoint-N folder in {output_dir}"
                            + (f"; skipped {'; '.join(skipped)}" if skipped else "")
                            + " (pass a checkpoint folder, or leave the flag out to start afresh)")


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True  # torch.save reports "file write failed", safetensors "StorageFull": both wrap ENOSPC
    text = str(err)
    return any(s in text for s in ("No space left on device", "StorageFull", "file write failed"))


def disk_full_error(folder: str | Path, err: BaseException) -> DiskFullError:
    """A DiskFullError naming ``folder`` and the bytes still free on its disk."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return DiskFullError(errno.ENOSPC, f"the disk is full: writing {folder} failed ({err}); {free} bytes free "
                                       f"on the disk of {probe}. Free some space or pass an --output_dir on a "
                                       "larger disk, then rerun with --resume_from_checkpoint last (incomplete "
                                       "checkpoints are skipped)")


@contextlib.contextmanager
def reporting_disk_full(folder: str | Path):
    """Turn a disk-full error of any writer (torch, safetensors, json) inside the block into DiskFullError."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if _is_disk_full(err):
            raise disk_full_error(folder, err) from err
        raise


def default_dtype(device: str) -> DType:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation_steps(batch_size: int, micro_batch_size: int, num_processes: int) -> int:
    """Micro-batches per optimizer step so that one step sees ``batch_size`` examples over all processes."""
    per_step = micro_batch_size * num_processes
    if micro_batch_size < 1 or batch_size < per_step or batch_size % per_step:
        raise ValueError(f"--batch_size {batch_size} must be a positive multiple of --micro_batch_size "
                         f"{micro_batch_size} x {num_processes} process(es) = {per_step}")
    return batch_size // per_step


@dataclass
class RecoveryConfig:
    output_dir: str = "tune_log/recover"
    batch_size: int = 128
    micro_batch_size: int = 4
    num_epochs: float = 5.0
    max_steps: int = -1
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=list)
    group_by_length: bool = False
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    dtype: DType = "fp32"
    seed: int = 42
    report_to: list[str] = field(default_factory=list)
    deepspeed: str | None = None
    fsdp: str = ""
    fsdp_config: str | None = None
    dataloader_num_workers: int = 0
    disable_tqdm: bool | None = None
    use_cpu: bool = False
    train_mode: Literal["lora", "full"] = "lora"  # full: every weight of the pruned model trains, no adapter


def wrap_lora(model, config: RecoveryConfig):
    """``model`` wrapped in a peft LoRA adapter on ``config.lora_target_modules`` (adapter weights in fp32)."""
    from peft import LoraConfig, get_peft_model
    if not config.lora_target_modules:
        raise ValueError("--lora_target_modules is empty: name at least one linear projection")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in config.lora_target_modules if t not in names]
    if unknown:
        raise ValueError(f"--lora_target_modules {unknown}: no such Linear module; the model has {sorted(names)}")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d alpha=%d on %s: %d trainable of %d parameters (%.2f%%)", config.lora_r,
                config.lora_alpha, ",".join(config.lora_target_modules), trainable, total, 100 * trainable / total)
    return peft_model


def training_arguments(config: RecoveryConfig, has_eval: bool, metric: str | None):
    from transformers import TrainingArguments
    gradient_accumulation_steps(config.batch_size, config.micro_batch_size, world_size())  # fail early
    args = TrainingArguments(
        output_dir=config.output_dir, per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.micro_batch_size,
        num_train_epochs=config.num_epochs, max_steps=config.max_steps, learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps, logging_steps=config.logging_steps, seed=config.seed,
        data_seed=config.seed, bf16=config.dtype == "bf16", fp16=config.dtype == "fp16",
        optim="adamw_torch", eval_strategy="steps" if has_eval else "no", eval_steps=config.eval_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        load_best_model_at_end=has_eval, metric_for_best_model=metric, greater_is_better=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random", report_to=config.report_to or "none",
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        deepspeed=config.deepspeed, fsdp=config.fsdp or None, fsdp_config=config.fsdp_config,
        dataloader_num_workers=config.dataloader_num_workers, disable_tqdm=config.disable_tqdm,
        use_cpu=config.use_cpu, remove_unused_columns=False)
    # the launcher (torchrun, accelerate, deepspeed) decides the number of processes; args knows it
    args.gradient_accumulation_steps = gradient_accumulation_steps(config.batch_size, config.micro_batch_size,
                                                                   args.world_size)
    return args


def _trainer_class():
    from transformers import Trainer

    class RecoveryTrainer(Trainer):
        """``Trainer`` that stops at the first NaN/inf training loss instead of training on silently."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            value = loss.detach().float().item()
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"training loss is {value} at optimizer step {self.state.global_step + 1} "
                    f"(dtype {'bf16' if self.args.bf16 else 'fp16' if self.args.fp16 else 'fp32'}); "
                    f"fp16 overflows easily on LLaMA-2 and pruned models: use --dtype bf16 or --dtype fp32, "
                    f"or lower --learning_rate")
            return loss

        def _save_checkpoint(self, model, trial):
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with reporting_disk_full(folder):
                return super()._save_checkpoint(model, trial)

    return RecoveryTrainer


def build_trainer(model, tokenizer, train_dataset, eval_datasets: dict | None, config: RecoveryConfig,
                  callbacks: list | None = None, trainer_class=None):
    """A ``Trainer`` for LoRA (or, with ``config.train_mode == "full"``, full-weight) recovery.
    ``eval_datasets``' first entry selects the best checkpoint; ``trainer_class`` replaces the default
    ``RecoveryTrainer`` (e.g. ``distill.distill_trainer_class``)."""
    from transformers import DataCollatorForSeq2Seq
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    if config.train_mode == "full":
        peft_model = model.requires_grad_(True)
        logger.info("full training: %d parameters", sum(p.numel() for p in model.parameters()))
    else:
        peft_model = model if hasattr(model, "peft_config") else wrap_lora(model, config)
    eval_datasets = eval_datasets or None
    metric = f"eval_{next(iter(eval_datasets))}_loss" if eval_datasets else None
    args = training_arguments(config, has_eval=eval_datasets is not None, metric=metric)
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True,
                                      label_pad_token_id=IGNORE_INDEX)
    trainer = (trainer_class or _trainer_class())(model=peft_model, args=args, train_dataset=train_dataset,
                               eval_dataset=eval_datasets, data_collator=collator,
                               processing_class=tokenizer, callbacks=callbacks)
    logger.info("batch %d = micro-batch %d x %d accumulation x %d process(es); dtype %s",
                config.batch_size, config.micro_batch_size, args.gradient_accumulation_steps, args.world_size,
                config.dtype)
    return trainer
