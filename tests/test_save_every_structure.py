"""Every structure the pruner produces saves and reloads, for every supported architecture (issue 11.1).

transformers 5 validates ``hidden_size % num_attention_heads == 0`` when a config is built or saved (and
OPT/BLOOM when their attention is built), so a pruned head count that does not divide the hidden size
(hidden 32 with 8 -> 6 heads below, LLaMA-7B's 32 -> 24 heads) used to crash ``save_pruned`` after
pruning had finished. The tiny configs here have 8 query heads in 4 KV groups (MHA 4 heads for OPT and
BLOOM) so that removing a quarter of the units gives such counts. Each case: prune, ``save_pruned``,
``load_pruned`` -> identical logits; where the folder is a stock checkpoint also a plain
``from_pretrained``, where it carries ``modeling_pruned.py`` also ``trust_remote_code=True``.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import perturbed_model
from test_architectures import ALL, ARCHS, logits
from LLMPruner.adapters import get_adapter
from LLMPruner.adapters.base import constructible_heads
from LLMPruner.checkpoint import load_pruned, save_pruned
from LLMPruner.prune import prune
from tolerance import assert_paths_agree

torch.set_num_threads(1)
WIDE = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=4)  # 25% of 4 KV groups: 6 heads
ALL_LAYERS = dict(attention_layers=range(0, 3), mlp_layers=range(0, 3))
CASES = {
    "block_wise_ranges": dict(mode="block_wise", pruning_ratio=0.5, attention_layers=range(1, 3),
                              mlp_layers=range(0, 2)),
    "block_wise_all_layers": dict(mode="block_wise", pruning_ratio=0.25, **ALL_LAYERS),  # uniform
    "round_to_8": dict(mode="block_wise", pruning_ratio=0.25, round_to=8, **ALL_LAYERS),
    "channel_wise": dict(mode="channel_wise", pruning_ratio=0.25),
    "layer_wise": dict(mode="layer_wise", layer=2),
    "param_budget": dict(mode="block_wise", param_budget=0.3),
    "depth_and_budget": dict(mode="block_wise", param_budget=0.3, prune_layers=1),
}


def build_wide(model_type: str, seed: int = 0, **extra):
    overrides = dict(ARCHS[model_type].config)
    if "num_key_value_heads" in overrides:  # the LLaMA-like ones (Gemma keeps head_dim != hidden/heads)
        overrides.update(WIDE, head_dim=6 if model_type.startswith("gemma") else 4)
        if model_type == "gemma2":
            overrides["query_pre_attn_scalar"] = 6
    overrides.update(extra)
    return perturbed_model(AutoConfig.for_model(model_type, vocab_size=64, tie_word_embeddings=False, **overrides),
                           seed)


def check_reloads(model, folder) -> dict:
    """load_pruned, and the stock route the folder claims; returns the written config."""
    expected = logits(model)
    again, _ = load_pruned(folder)
    assert_paths_agree(logits(again), expected)
    config = json.loads((folder / "config.json").read_text())
    record = json.loads((folder / "pruning.json").read_text())
    stock = None
    if "auto_map" in config:  # heterogeneous (or non-stock) LLaMA/Mistral/Qwen2: the copied modeling file
        stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    elif record["loader"] == "transformers":
        assert "layer_shapes" not in config, "a folder claiming stock loading must not need layer_shapes"
        stock = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        get_adapter(stock).prepare(stock)
    if stock is not None:
        assert_paths_agree(logits(stock.eval()), expected)
    return config


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_type", ALL)
def test_every_structure_saves_and_reloads(model_type, case, tmp_path):
    model = build_wide(model_type)
    examples = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    prune(model, pruner_type="l2", examples=examples, **CASES[case])
    save_pruned(model, None, tmp_path / "ckpt")
    config = check_reloads(model, tmp_path / "ckpt")
    AutoConfig.for_model(**config)  # the written config validates under transformers' strict checks
    structure = get_adapter(model).read_structure(model)
    if "layer_shapes" not in config:
        assert structure.is_uniform()


def test_uniform_llama_with_non_dividing_heads_is_the_reported_crash(tmp_path):
    """The issue's case: every layer 8 -> 6 heads at hidden 32: uniform, but no stock config holds it."""
    model = build_wide("llama")
    prune(model, pruner_type="l2", **CASES["block_wise_all_layers"])
    structure = get_adapter(model).read_structure(model)
    assert structure.is_uniform() and structure.layers[0].num_attention_heads == 6
    save_pruned(model, None, tmp_path / "ckpt")
    config = check_reloads(model, tmp_path / "ckpt")
    assert config["head_dim"] == 4 and config["hidden_size"] == 32
    assert [s["num_attention_heads"] for s in config["layer_shapes"]] == [6, 6, 6]
    assert config["hidden_size"] % config["num_attention_heads"] == 0  # a placeholder that validates


def test_llama_7b_shaped_32_to_24_heads(tmp_path):
    """LLaMA-7B's head layout (32 MHA heads, head_dim = hidden/32), tiny: 32 -> 24 heads in every layer."""
    model = build_wide("llama", hidden_size=64, num_attention_heads=32, num_key_value_heads=32, head_dim=2,
                       intermediate_size=48)
    prune(model, pruner_type="l2", **CASES["block_wise_all_layers"])
    assert get_adapter(model).read_structure(model).layers[0].num_attention_heads == 24
    save_pruned(model, None, tmp_path / "ckpt")
    check_reloads(model, tmp_path / "ckpt")
    again, _ = load_pruned(tmp_path / "ckpt")
    save_pruned(again, None, tmp_path / "again")  # a reloaded model saves again (placeholders round-trip)
    check_reloads(again, tmp_path / "again")


@pytest.mark.parametrize("hidden, heads, kv, expected", [
    (64, 8, 4, (8, 4)), (64, 6, 3, (4, 2)), (4096, 24, 24, (16, 16)), (32, 3, 1, (2, 1)), (30, 7, 7, (6, 6))])
def test_constructible_heads(hidden, heads, kv, expected):
    assert constructible_heads(hidden, heads, kv) == expected
