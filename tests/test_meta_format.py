"""Meta's original LLaMA layout as input: stories260K-meta matches stories260K, and a two-shard
checkpoint written here from a tiny model converts back to that model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED, STORIES, need_shared, tiny_model
from LLMPruner.checkpoint import CheckpointError, load_model, save_pruned
from LLMPruner.checkpoint.meta import LAYER_KEYS, convert_meta, load_meta, save_meta, unpermute
from tolerance import assert_paths_agree

torch.set_num_threads(1)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face rows -> Meta's interleaved rotary rows (the inverse of ``unpermute``)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_meta_shards(model, n_shards: int) -> tuple[list[dict], dict]:
    """Write a Hugging Face Llama the way Meta's model-parallel checkpoints store it."""
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
            "norm.weight": (sd["model.norm.weight"], None), "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        for meta_key, (hf_key, split) in LAYER_KEYS.items():
            w = sd[f"model.layers.{i}.{hf_key}"]
            if meta_key == "attention.wq.weight":
                w = permute(w, c.num_attention_heads)
            elif meta_key == "attention.wk.weight":
                w = permute(w, c.num_key_value_heads)
            full[f"layers.{i}.{meta_key}"] = (w, split)
    shards = [{} for _ in range(n_shards)]
    for key, (w, split) in full.items():
        parts = [w] * n_shards if split is None else list(w.chunk(n_shards, dim=split))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    params = {"dim": c.hidden_size, "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
              "n_layers": c.num_hidden_layers, "norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
              "multiple_of": 16, "rope_theta": 10000.0}
    return shards, params


def test_unpermute_inverts_permute():
    w = torch.arange(4 * 8 * 3, dtype=torch.float).view(32, 3)
    assert torch.equal(unpermute(permute(w, 4), 4), w)
    # head 0 of Meta's layout pairs rows (0,1),(2,3),...; Hugging Face's puts the first of each pair first
    assert unpermute(w, 4)[:8, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21]


@pytest.mark.parametrize("n_shards", [1, 2])
def test_sharded_meta_checkpoint_converts_back(tmp_path, n_shards):
    model = tiny_model(hidden_size=32, intermediate_size=48, vocab_size=64)
    shards, params = to_meta_shards(model, n_shards)
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    converted, tokenizer = load_model(tmp_path)
    assert tokenizer is None
    ids = torch.tensor([[1, 5, 9, 3, 17, 30]])
    with torch.no_grad():
        assert_paths_agree(converted(ids).logits, model(ids).logits)
    assert converted.config.num_key_value_heads == 2 and converted.config.intermediate_size == 48


def test_missing_tensor_in_a_shard_is_named():
    shards, params = to_meta_shards(tiny_model(), 2)
    del shards[1]["layers.2.feed_forward.w2.weight"]
    with pytest.raises(CheckpointError, match=r"layers.2.feed_forward.w2.weight.*shard\(s\) \[1\]"):
        convert_meta(shards, params)


def test_stories260k_meta_matches_hf(tmp_path):
    meta = need_shared("models", "stories260K-meta")
    need_shared("models", "stories260K")
    converted, tokenizer = load_model(meta)
    reference, ref_tokenizer = load_model(STORIES)
    text = (SHARED / "data" / "tinystories" / "tinystories_val.txt").read_text()[:3000] \
        if (SHARED / "data" / "tinystories").exists() else "Once upon a time, there was a little girl."
    assert tokenizer(text).input_ids == ref_tokenizer(text).input_ids
    ids = ref_tokenizer(text[:400], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)  # two paths, real logits ~10: PATHS scaled
    assert converted.config.tie_word_embeddings and converted.config.num_key_value_heads == 4
    # converted once, it is an ordinary checkpoint
    folder = save_pruned(converted, tokenizer, tmp_path / "hf", provenance={"base_model": str(meta)})
    again, tok = load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)  # two paths, real logits ~10: PATHS scaled
    start = tok("", return_tensors="pt").input_ids
    out = again.generate(start, max_new_tokens=14, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith("Once upon a time")


def test_meta_dtype(tmp_path):
    meta = need_shared("models", "stories260K-meta")
    model, _ = load_meta(meta, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_export_to_meta_and_back(tmp_path):
    from test_checkpoint_roundtrip import block_wise, channel_wise, layer_wise
    model = layer_wise(tiny_model())
    folder = save_meta(model, tmp_path / "meta")
    assert json.loads((folder / "params.json").read_text())["n_layers"] == 2
    back, _ = load_meta(folder)
    ids = torch.tensor([[1, 5, 9, 3, 17, 30]])
    with torch.no_grad():
        assert_paths_agree(back(ids).logits, model(ids).logits)
    with pytest.raises(CheckpointError, match="different shapes"):
        save_meta(block_wise(tiny_model()), tmp_path / "het")
    with pytest.raises(CheckpointError, match="hidden 24, 4 x 8"):
        save_meta(channel_wise(tiny_model()), tmp_path / "narrow")
