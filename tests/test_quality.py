"""Issue 10: reference rounding, query heads inside KV groups, budget criteria, sequential refit."""
import copy
import json

import pytest
import torch

from conftest import need_shared, tiny_model
from LLMPruner.select.budget import non_embedding_parameters
from LLMPruner.compensate.refit import CrossStats, reconstruction_objective, refit_layer
from LLMPruner.prune import prune
from LLMPruner.select.units import removed_count
from tolerance import assert_paths_agree

EX = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
LAYERS = dict(attention_layers=range(1, 3), mlp_layers=range(1, 3))


def _three_groups(**kw):
    """3 KV groups of 3 query heads (SmolLM2's attention shape, tiny): hidden 72, head_dim 8, MLP 64."""
    return tiny_model(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                      intermediate_size=64, **kw)


def _logits(model, ids=EX):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_removed_count_by_hand():
    assert removed_count(3, 3, 0.25, 64) == 0      # 192 - int(144.0) = 48 channels < one group of 64
    assert removed_count(3, 3, 0.5, 64) == 1       # 96 channels -> 1 group
    assert removed_count(1536, 1536, 0.25) == 384  # MLP 1536 -> 1152
    assert removed_count(3, 3, 0.25, 64, "nearest") == 1
    assert removed_count(2, 2, 0.99, 64) == 1      # never the last unit


@pytest.mark.parametrize("ratio,kv,mlp", [(0.25, 3, 48), (0.5, 2, 32)])
def test_reference_rounding_on_three_kv_groups(ratio, kv, mlp):
    model = _three_groups()
    s = prune(model, pruning_ratio=ratio, pruner_type="l2", **LAYERS).structure.layers
    assert [(l.num_key_value_heads, l.intermediate_size) for l in s] == [(3, 64), (kv, mlp), (kv, mlp)]
    assert [l.num_attention_heads for l in s] == [9, 3 * kv, 3 * kv]


def test_nearest_rounding_is_an_explicit_option():
    model = _three_groups()
    s = prune(model, pruning_ratio=0.25, pruner_type="l2", unit_rounding="nearest", **LAYERS).structure.layers
    assert [l.num_key_value_heads for l in s] == [3, 2, 2]


def _zero_query_heads(model, layer, heads, head_dim=8):
    attn = model.model.layers[layer].self_attn
    with torch.no_grad():
        for h in heads:
            attn.q_proj.weight[h * head_dim:(h + 1) * head_dim] = 0
            attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0


def test_query_head_removal_of_zeroed_heads_is_exact_and_saves(tmp_path):
    from LLMPruner.checkpoint import load_pruned, save_pruned
    model = _three_groups()
    _zero_query_heads(model, 1, [1, 3, 8])  # one head in each of the 3 groups (heads 0-2, 3-5, 6-8)
    _zero_query_heads(model, 2, [0, 5, 7])
    before = _logits(model)
    s = prune(model, pruning_ratio=0.34, pruner_type="l2", query_heads=True, attention_layers=range(1, 3),
              mlp_layers=range(0)).structure.layers
    assert [(l.num_attention_heads, l.num_key_value_heads) for l in s] == [(9, 3), (6, 3), (6, 3)]
    assert model.model.layers[1].self_attn.num_key_value_groups == 2
    assert_paths_agree(_logits(model), before)
    out = model.generate(EX[:1], max_new_tokens=5, do_sample=False)  # KV cache, per-layer head counts
    assert out.shape[1] == EX.shape[1] + 5
    save_pruned(model, None, tmp_path / "ckpt")
    loaded, _ = load_pruned(tmp_path / "ckpt")
    assert_paths_agree(_logits(loaded), before)
    assert torch.equal(loaded.generate(EX[:1], max_new_tokens=5, do_sample=False), out)


def test_budget_with_query_heads_keeps_valid_gqa_and_the_budget():
    model = _three_groups(num_hidden_layers=4)
    start = non_embedding_parameters(model)
    prune(model, pruner_type="taylor", param_budget=0.3, query_heads=True, examples=EX,
          attention_layers=range(0, 4), mlp_layers=range(0, 4))
    removed = start - non_embedding_parameters(model)
    assert 0 <= 0.3 * start - removed <= 2 * 8 * 72 * 3 + 2 * 8 * 72 * 2  # never over, under by less than the largest unit
    for layer in model.model.layers:
        attn = layer.self_attn
        heads, kv = attn.o_proj.in_features // 8, attn.k_proj.out_features // 8
        assert heads % kv == 0 and attn.num_key_value_groups == heads // kv
    assert model.generate(EX[:1], max_new_tokens=3, do_sample=False).shape[1] == EX.shape[1] + 3


def test_budget_counts_the_biases_that_compensation_adds():
    model = tiny_model(num_hidden_layers=4)
    start = sum(p.numel() for p in model.parameters())
    target = int(0.3 * non_embedding_parameters(model))
    prune(model, pruner_type="fluctuation", param_budget=0.3, examples=EX, compensation="bias",
          attention_layers=range(0, 4), mlp_layers=range(0, 4))
    removed = start - sum(p.numel() for p in model.parameters())  # biases included
    assert model.config.mlp_bias
    assert 0 <= target - removed <= 3 * 32 + 48  # at most one MLP channel (+ its bias row) short


def _stats(x, xp):
    s = CrossStats.empty(x.shape[1])
    s.add(x.float(), xp.float())
    return s


def test_refit_is_exact_when_a_removed_input_is_a_combination_of_kept_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    x[:, 5] = 2 * x[:, 0] - x[:, 1]
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    kept = torch.arange(5)
    v, report = refit_layer(w, _stats(x[::2], x[::2]), kept, check=_stats(x[1::2], x[1::2]))
    assert "lowers" in report
    torch.testing.assert_close(x.double()[:, :5] @ v.T, x.double() @ w.T, atol=1e-2, rtol=0)


def test_refit_falls_back_to_slicing_when_it_would_hurt_held_out_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    x_fit = x.clone()
    x_fit[:, 5] = x_fit[:, 0] * 3  # on the fit tokens input 5 looks like a copy of input 0 ...
    x_chk = x.clone()
    x_chk[:, 5] = 0                # ... on held-out tokens it is silent: refitting onto input 0 hurts
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    kept = torch.arange(5)
    check = _stats(x_chk, x_chk)
    v, report = refit_layer(w, _stats(x_fit, x_fit), kept, check=check)
    assert "sliced only" in report and torch.equal(v, w[:, kept])
    v_fit, _ = refit_layer(w, _stats(x_fit, x_fit), kept)  # judged on its own tokens it would refit
    assert reconstruction_objective(w, v_fit, check, kept) > reconstruction_objective(w, w[:, kept], check, kept)


def _final_hidden_error(model, dense):
    with torch.no_grad():
        a = model.model(EX, use_cache=False).last_hidden_state
        b = dense.model(EX, use_cache=False).last_hidden_state
    return float(((a - b) ** 2).sum())


def test_sequential_refit_is_never_worse_than_slicing_on_calibration():
    dense = tiny_model(num_hidden_layers=4, intermediate_size=24)
    ex = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(2))
    errors = {}
    for method in ("none", "refit"):
        model = copy.deepcopy(dense)
        prune(model, pruner_type="wanda", pruning_ratio=0.5, examples=ex, compensation=method,
              attention_layers=range(0), mlp_layers=range(0, 4), calibration_batch_size=4)
        errors[method] = _final_hidden_error(model, dense)
    assert errors["refit"] < errors["none"]


def test_refit_with_too_few_calibration_tokens_is_refused():
    with pytest.raises(ValueError, match="--num_examples / --calibration_seq_len"):
        prune(tiny_model(), pruner_type="wanda", pruning_ratio=0.25, examples=EX[:2, :8], compensation="refit",
              **LAYERS)


@pytest.mark.slow
def test_smollm2_reference_flags_give_the_reference_parameter_counts():
    from LLMPruner.checkpoint import load_model
    from LLMPruner.shrink import count_parameters
    dense, _ = load_model(str(need_shared("models", "SmolLM2-135M-Instruct-Q4_1")), device="cpu")
    ranges = dict(attention_layers=range(4, 28), mlp_layers=range(4, 28))  # --block_*_layer_start 4 --end 28
    for ratio, params, kv, mlp in [(0.25, 118_589_760, 3, 1152), (0.5, 95_586_624, 2, 768)]:
        model = copy.deepcopy(dense)
        s = prune(model, pruning_ratio=ratio, pruner_type="l2", **ranges).structure.layers
        assert count_parameters(model) == params
        assert {(l.num_key_value_heads, l.intermediate_size) for l in s[4:28]} == {(kv, mlp)}
        assert {(l.num_key_value_heads, l.intermediate_size) for l in s[:4] + s[28:]} == {(3, 1536)}


def test_taylor_gradient_in_chunks_equals_one_batch(monkeypatch):
    import LLMPruner.score.estimate as est
    from LLMPruner.discover import discover
    model = tiny_model()
    fams = discover(model).families
    ex = torch.randint(0, 64, (20, 16), generator=torch.Generator().manual_seed(3))
    chunked = est.estimate(model, fams, pruner_type="taylor", examples=ex)      # 16 + 4 samples
    monkeypatch.setattr(est, "GRAD_CHUNK", 64)
    whole = est.estimate(model, fams, pruner_type="taylor", examples=ex)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-4, atol=1e-7)


def test_uniform_budget_spreads_evenly_and_never_overshoots():
    model = tiny_model(num_hidden_layers=4)
    start = non_embedding_parameters(model)
    s = prune(model, pruner_type="l2", param_budget=0.2, attention_layers=range(0),
              mlp_layers=range(1, 4)).structure.layers
    sizes = [l.intermediate_size for l in s]
    assert sizes[0] == 48 and max(sizes[1:]) - min(sizes[1:]) <= 1
    removed = start - non_embedding_parameters(model)
    assert 0 <= int(0.2 * start) - removed < 3 * 32


def test_budget_without_ranges_protects_first_and_last_layers_of_deep_models():
    model = tiny_model(num_hidden_layers=8)
    s = prune(model, pruner_type="l2", param_budget=0.2).structure.layers
    assert s[0].intermediate_size == s[-1].intermediate_size == 48
    assert all(l.intermediate_size < 48 for l in s[1:-1])


def test_cli_refuses_refit_with_too_few_tokens_and_runs_query_heads(tmp_path):
    from test_cli_prune import run
    model = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    base = ["--base_model", str(model), "--device", "cpu", "--eval_device", "cpu", "--calibration_data", str(text)]
    proc = run(base + ["--pruner_type", "wanda", "--compensation", "refit", "--num_examples", "2"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--compensation refit: 128 calibration tokens (2 x 64) for inputs 172 wide" in proc.stderr
    assert "--num_examples / --calibration_seq_len" in proc.stderr
    assert not (tmp_path / "prune_log").exists()  # nothing written
    proc = run(base + ["--pruner_type", "taylor", "--query_heads", "--pruning_ratio", "0.5",
                       "--block_attention_layer_start", "1", "--block_attention_layer_end", "4",
                       "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4", "--compensation", "refit",
                       "--num_examples", "16", "--save_model", "--save_ckpt_log_name", "qh"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from LLMPruner.checkpoint import load_pruned
    loaded, _ = load_pruned(tmp_path / "prune_log" / "qh")
    shapes = [(l.self_attn.o_proj.in_features // 8, l.self_attn.k_proj.out_features // 8)
              for l in loaded.model.layers]
    assert shapes == [(8, 4), (4, 4), (4, 4), (4, 4), (8, 4)]  # 2 query heads per KV group -> 1
    proc = run(base + ["--pruner_type", "l2", "--param_budget", "0.1", "--skip_attention",
                       "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4", "--save_ckpt_log_name", "mlp"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = json.loads((tmp_path / "prune_log" / "mlp" / "results.json").read_text())["structure"]["layers"]
    assert [l["num_attention_heads"] for l in layers] == [8] * 5
    assert [l["intermediate_size"] for l in layers][::4] == [172, 172] and layers[1]["intermediate_size"] < 172
