"""Loading models and saving pruned checkpoints (safetensors, never pickles).

- ``save_pruned(model, tokenizer, folder, provenance=...)``: an atomic, self-describing folder.
- ``load_pruned(folder, device_map=..., torch_dtype=...)``: strict loading, heterogeneous layers included.
- ``load_model(name_or_path, device=..., dtype=...)``: anything ``--base_model`` accepts.
See docs/checkpoints.md.
"""
from __future__ import annotations

from LLMPruner.checkpoint.build import CheckpointError
from LLMPruner.checkpoint.legacy import load_legacy_pickle
from LLMPruner.checkpoint.load import load_model, load_pruned
from LLMPruner.checkpoint.meta import convert_meta, load_meta
from LLMPruner.checkpoint.save import save_pruned

__all__ = ["CheckpointError", "convert_meta", "load_legacy_pickle", "load_meta", "load_model", "load_pruned",
           "save_pruned"]
