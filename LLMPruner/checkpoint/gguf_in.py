"""GGUF input: a ``.gguf`` file (or a folder holding exactly one) as ``--base_model``.

The tensors are dequantised by transformers' own GGUF loader (``gguf_file=``, which needs the ``gguf``
package), so any llama.cpp / ollama model of an architecture transformers reads can be pruned. The
quantizer state transformers attaches is dropped, so the result saves as an ordinary safetensors
checkpoint. Files transformers cannot read — llama.cpp's ``deci``, per-layer head/MLP arrays, pruned
heads (heads x head_dim != hidden), as LLMPruner's GGUF export writes them — go to ``gguf_layers``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from LLMPruner.checkpoint.build import CheckpointError
from LLMPruner.checkpoint.gguf_layers import has_per_layer_shapes, load_per_layer_gguf

logger = logging.getLogger(__name__)


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the single ``*.gguf`` in a folder without
    ``config.json``; ``None`` when ``path`` is not GGUF input."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{path}: holds {len(found)} .gguf files ({', '.join(f.name for f in found)});"
                                  " pass the one to load as --base_model FILE.gguf")
        return found[0] if found else None
    return None


def load_gguf(file: Path, dtype: torch.dtype | str = "auto"):
    """``(model, tokenizer)`` dequantised from ``file`` (float32 unless ``dtype`` says otherwise)."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as err:
        raise CheckpointError(f"{file}: reading GGUF needs the 'gguf' package: pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if dtype in (None, "auto"):
        dtype = torch.float32  # dequantised weights: fp32 keeps them exact
    logger.info("dequantising %s (GGUF) to %s", file, dtype)
    try:
        if has_per_layer_shapes(file):  # llama.cpp's 'deci' or per-layer arrays: transformers reads neither
            model, tokenizer = load_per_layer_gguf(file, dtype=dtype)
            model.config.name_or_path = str(file)
            return model, tokenizer
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{file}: cannot be read as a GGUF model by transformers ({err})") from err
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(file)
    return model, tokenizer
