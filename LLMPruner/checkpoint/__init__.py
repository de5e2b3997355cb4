"""Loading models and saving pruned checkpoints (safetensors, never pickles)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def load_model(name_or_path: str, device: str = "cpu", dtype: torch.dtype | str = "auto"):
    """``(model, tokenizer)`` from a Hugging Face id or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not Path(name_or_path).exists() and (name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1):
        raise FileNotFoundError(f"--base_model {name_or_path!r}: no such folder")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model.to(device), tokenizer


def save_pruned(model, tokenizer, folder: str | Path, provenance: dict | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` to ``folder`` as safetensors + config."""
    folder = Path(folder)
    if provenance is not None:
        model.config.llmpruner = {"provenance": provenance}
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
