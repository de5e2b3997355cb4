"""Fold a LoRA adapter into the (pruned) weights and save it as a pruned checkpoint.

``W' = W + (alpha / r) * B @ A`` per target Linear (peft's ``merge_and_unload``); the result is a plain
``*ForCausalLM`` with the pruned shapes, written with ``LLMPruner.checkpoint.save_pruned`` so that
``load_model`` reads it back like any pruned model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from LLMPruner.adapters import get_adapter
from LLMPruner.checkpoint import load_model, save_pruned

logger = logging.getLogger(__name__)


def merge_lora(peft_model) -> torch.nn.Module:
    """The base model with every LoRA update folded in (no peft wrappers left)."""
    merged = peft_model.merge_and_unload(progressbar=False, safe_merge=True)
    get_adapter(merged).update_config(merged)
    return merged


def save_merged(peft_model, tokenizer, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge ``peft_model`` (best in fp32) and write it to ``folder``, cast to ``dtype`` if given, in the
    project's pruned-checkpoint format."""
    merged = merge_lora(peft_model)
    if dtype is not None:
        merged = merged.to(dtype)
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.pad_token_id = None  # a pad id set for training is no generation default
    path = Path(save_pruned(merged, tokenizer, folder) or folder)
    logger.info("merged model written to %s", path)
    return path


def merge_adapter(prune_model: str, adapter_dir: str, output_dir: str, device: str = "cpu", *,
                  allow_pickle: bool = False) -> Path:
    """Load a pruned model and a saved peft adapter, merge them, save the result (the stand-alone command)."""
    from peft import PeftModel
    adapter_path = Path(adapter_dir)
    if not (adapter_path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter_dir!r}: no adapter_config.json (expected a peft adapter "
                                f"folder, e.g. OUTPUT_DIR/adapter or OUTPUT_DIR/checkpoint-N)")
    model, tokenizer = load_model(prune_model, device=device, dtype=torch.float32, allow_pickle=allow_pickle)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    return save_merged(peft_model, tokenizer, output_dir)
