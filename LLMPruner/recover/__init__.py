"""Recovery: LoRA fine-tuning of a pruned model on instruction data, then merging the adapter.

Stages: ``prompts`` (templates) → ``data`` (tokenize with prompt masking) → ``train`` (peft + Trainer)
→ ``merge`` (fold LoRA into the pruned weights, save as a pruned checkpoint). Distillation from the dense
model: ``packing`` (text into blocks) → ``kd_loss`` (chunked KL/CE) → ``distill`` (the ``Trainer`` subclass).
"""
from __future__ import annotations

import importlib

#: public name -> submodule; loaded on first use, so that post_training.py's parser (distill_cli) needs no torch
_PUBLIC = {
    "IGNORE_INDEX": "data", "DataFormatError": "data", "build_instruction_datasets": "data",
    "build_text_eval_dataset": "data", "load_instruction_records": "data", "tokenize_example": "data",
    "DistillConfig": "distill", "distill_trainer_class": "distill", "chunked_kd_loss": "kd_loss",
    "merge_adapter": "merge", "merge_lora": "merge", "save_merged": "merge",
    "build_packed_datasets": "packing", "pack_documents": "packing", "TEMPLATES": "prompts", "Prompter": "prompts",
    "DiskFullError": "train", "RecoveryConfig": "train", "TrainingDivergedError": "train", "build_trainer": "train",
    "default_dtype": "train", "gradient_accumulation_steps": "train", "last_complete_checkpoint": "train",
    "reporting_disk_full": "train", "wrap_lora": "train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
