"""Efficiency statistics: hand-counted parameters/MACs, a heterogeneous pruned model, latency runs."""
from __future__ import annotations

import torch

from conftest import tiny_model
from LLMPruner.adapters import get_adapter
from LLMPruner.evaluate.stats import count_macs, count_parameters, model_bytes, model_statistics


def _prune_layer_1(model) -> None:
    """Layer 1 keeps 2 of 4 query heads (kv 2) and 40 of 48 MLP channels: a heterogeneous model."""
    from LLMPruner.structure import LayerShape
    adapter = get_adapter(model)
    adapter.resize_layer(adapter.decoder_layers(model)[1], LayerShape(2, 2, 40), hidden_size=32, head_dim=8)


def test_dense_counts_by_hand():
    model = tiny_model()  # hidden 32, 3 layers, heads 4/kv 2, head_dim 8, mlp 48, vocab 64, untied
    per_layer_linear = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 48)  # q, k+v, o, gate/up/down
    per_layer = per_layer_linear + 2 * 32  # two RMSNorm weights
    expected = 3 * per_layer + 64 * 32 * 2 + 32  # + embed, lm_head, final norm
    assert count_parameters(model) == expected
    assert model_bytes(model) >= expected * 4
    macs = count_macs(model, seq_len=10)
    assert macs["linear"] == 10 * (3 * per_layer_linear + 32 * 64)
    assert macs["attention"] == 3 * 2 * 4 * 8 * 10 * 10
    assert macs["total"] == macs["linear"] + macs["attention"]


def test_pruned_model_is_smaller_by_the_removed_count():
    dense, pruned = tiny_model(), tiny_model()
    _prune_layer_1(pruned)
    removed = 2 * (2 * 8 * 32) + 3 * (8 * 32)  # q rows + o cols of 2 heads; 8 MLP channels x 3 projections
    assert count_parameters(dense) - count_parameters(pruned) == removed
    d, p = count_macs(dense, 16), count_macs(pruned, 16)
    assert d["linear"] - p["linear"] == 16 * removed
    assert d["attention"] - p["attention"] == 2 * 2 * 8 * 16 * 16  # 2 fewer heads in one layer
    with torch.no_grad():  # the heterogeneous model still runs
        assert pruned(torch.zeros(1, 16, dtype=torch.long)).logits.shape == (1, 16, 64)


def test_model_statistics_measures_latency_for_dense_and_pruned():
    dense, pruned = tiny_model(), tiny_model()
    _prune_layer_1(pruned)
    sd = model_statistics(dense, seq_len=16, new_tokens=4, repeats=2)
    sp = model_statistics(pruned, seq_len=16, new_tokens=4, repeats=2)
    for stats in (sd, sp):
        assert stats["forward_ms"] > 0 and stats["generate_tokens_per_s"] > 0
        assert stats["device"] == "cpu" and "peak_forward_mb" not in stats
    assert sp["params"] < sd["params"] and sp["macs_total"] < sd["macs_total"]
    assert sp["model_mb"] < sd["model_mb"]
