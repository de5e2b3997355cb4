"""The reference LLM-Pruner's checkpoints: ``torch.save({'model': model, 'tokenizer': tokenizer})``.

Such a file is a pickle: loading it executes whatever code it names, and PyTorch >= 2.6 refuses it by
default. It is loaded only with ``allow_pickle=True`` (``--allow_pickle``), and then converted at once:
the weights and config are taken out of the unpickled object and put into a fresh model of the
installed transformers, whose per-layer shapes are read from the weights (the reference never wrote
them into the config). Save the result with ``save_pruned`` to get a safe checkpoint.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from LLMPruner.checkpoint.build import CheckpointError, model_from_state_dict

logger = logging.getLogger(__name__)

PICKLE_NAMES = ("pytorch_model.bin",)
#: buffers older transformers saved that the current models recompute
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_legacy_pickle(path: Path) -> bool:
    """A reference checkpoint file, or a folder holding one without a ``config.json``."""
    if path.is_file():
        return path.suffix in (".bin", ".pt", ".pth")
    return (path.is_dir() and not (path / "config.json").exists()
            and any((path / n).is_file() for n in PICKLE_NAMES))


def load_legacy_pickle(path: str | Path, allow_pickle: bool = False, dtype: torch.dtype | str = "auto"):
    """``(model, tokenizer)`` converted from a reference pickle; refuses unless ``allow_pickle``."""
    path = Path(path)
    if path.is_dir():
        path = next(path / n for n in PICKLE_NAMES if (path / n).is_file())
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickled checkpoint (the reference LLM-Pruner's format): loading it runs arbitrary "
            "code stored in the file. Only if you trust its source, pass allow_pickle=True (--allow_pickle); "
            "it is then converted, and save_pruned writes it as safetensors.")
    logger.warning("unpickling %s: this executes code from the file (allow_pickle=True)", path)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path}: expected a dict with 'model' (and 'tokenizer'), as the reference "
                              f"saves; found {type(obj).__name__}")
    old = obj["model"]
    state_dict = {k: v for k, v in old.state_dict().items() if not k.endswith(DROPPED_SUFFIXES)}
    config = _fresh_config(old.config)
    model = model_from_state_dict(config, state_dict)
    if dtype != "auto":
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model, obj.get("tokenizer")


def _fresh_config(old_config):
    """The installed transformers' config class, filled from an unpickled (possibly older) config."""
    from transformers import AutoConfig
    values = {k: v for k, v in vars(old_config).items() if not k.startswith("_")}
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    model_type = values.pop("model_type", None) or getattr(old_config, "model_type", None)
    values.pop("layer_shapes", None)  # rebuilt from the weights
    return AutoConfig.for_model(model_type, **values)
