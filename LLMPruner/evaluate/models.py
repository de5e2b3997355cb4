"""Checkpoint specs for evaluation: ``NAME=MODEL[+LORA_DIR]`` -> a model ready to evaluate.

``MODEL`` is a Hugging Face id or folder (base or pruned, loaded by ``LLMPruner.checkpoint.load_model``);
``LORA_DIR`` is a peft adapter folder (e.g. ``tune/checkpoint-200``), merged into the weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    model: str
    lora: str | None = None


def parse_spec(text: str) -> CheckpointSpec:
    """``"pruned+lora=out/pruned+out/tune/checkpoint-200"`` -> CheckpointSpec (the name is optional)."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    model, _, lora = rest.partition("+")
    if not model:
        raise ValueError(f"--checkpoints {text!r}: expected NAME=MODEL or NAME=MODEL+LORA_DIR")
    if lora and not Path(lora).is_dir():
        raise FileNotFoundError(f"--checkpoints {text!r}: LoRA folder {lora!r} does not exist")
    return CheckpointSpec(name=name or Path(rest).name or rest, model=model, lora=lora or None)


def load_for_eval(spec: CheckpointSpec, device: str = "cpu", dtype: torch.dtype | str = "auto", *,
                  allow_pickle: bool = False):
    """``(model, tokenizer)`` of a spec, with its LoRA adapter merged when given (``allow_pickle``: see
    ``load_model``)."""
    from ..checkpoint import load_model
    model, tokenizer = load_model(spec.model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    if spec.lora:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, spec.lora).merge_and_unload()
        logger.info("%s: merged LoRA adapter %s", spec.name, spec.lora)
    return model.eval(), tokenizer
