"""Recovery: LoRA fine-tuning of a pruned model on instruction data, then merging the adapter.

Stages: ``prompts`` (templates) → ``data`` (tokenize with prompt masking) → ``train`` (peft + Trainer)
→ ``merge`` (fold LoRA into the pruned weights, save as a pruned checkpoint). Distillation from the dense
model: ``packing`` (text into blocks) → ``kd_loss`` (chunked KL/CE) → ``distill`` (the ``Trainer`` subclass).
"""
from __future__ import annotations

from .data import (IGNORE_INDEX, DataFormatError, build_instruction_datasets, build_text_eval_dataset,
                   load_instruction_records, tokenize_example)
from .distill import DistillConfig, distill_trainer_class
from .kd_loss import chunked_kd_loss
from .merge import merge_adapter, merge_lora, save_merged
from .packing import build_packed_datasets, pack_documents
from .prompts import TEMPLATES, Prompter
from .train import (DiskFullError, RecoveryConfig, TrainingDivergedError, build_trainer, default_dtype,
                    gradient_accumulation_steps, last_complete_checkpoint, reporting_disk_full, wrap_lora)

__all__ = ["DistillConfig", "build_packed_datasets", "chunked_kd_loss", "distill_trainer_class", "pack_documents",
           "IGNORE_INDEX", "DataFormatError", "DiskFullError", "last_complete_checkpoint", "reporting_disk_full",
           "Prompter", "RecoveryConfig", "TEMPLATES",
           "TrainingDivergedError", "build_instruction_datasets", "build_text_eval_dataset", "build_trainer",
           "default_dtype", "gradient_accumulation_steps", "load_instruction_records", "merge_adapter",
           "merge_lora", "save_merged", "tokenize_example", "wrap_lora"]
