"""GGUF as --base_model: a folder or file is dequantised by transformers and saves as safetensors."""
from __future__ import annotations

import pytest
import torch

from LLMPruner.checkpoint import CheckpointError, load_model
from LLMPruner.checkpoint.gguf_in import gguf_file_of

from conftest import need_shared

SMOL = ("models", "SmolLM2-135M-Instruct-Q4_1")


def test_folder_with_two_gguf_files_is_refused(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="2 .gguf files"):
        gguf_file_of(tmp_path)


def test_garbage_gguf_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="model.gguf"):
        load_model(bad)


@pytest.mark.slow
def test_smollm2_gguf_loads_and_answers():
    folder = need_shared(*SMOL)
    model, tok = load_model(folder, dtype=torch.float32)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(cfg, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")
