"""Mixture-of-experts models: whole experts removed (``LLMPruner/experts/core.py``, ``hf_prune.py --prune_experts``).

Tiny Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, GPT-OSS, PhiMoE, FlexOlmo, Command A MoE, GLM-4.5 (``glm4_moe``),
MiniMax-M2, Hunyuan-A13B, DeepSeek-V2 and DeepSeek-V3 models built in code (transformers 5's fused
``[E, ...]`` experts): the scores are what the router and the experts compute (frequency counted from the
router's choices, REAP by hand), removing experts no token chose leaves renormalising routers' logits
exactly unchanged, every layer loses the same experts count, the result reloads with the stock class
(and generates with the KV cache), a saved plan replays, and the CLI refuses what it cannot do."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from cli_helpers import run_cli
from conftest import need_shared
from LLMPruner import load_pruned, prune, save_pruned
from LLMPruner.adapters import UnsupportedArchitectureError
from LLMPruner.experts.core import (ExpertPruningError, check_expert_count, choose_experts, expert_scores, kept_experts,
                               moe_layers, remove_experts)
from LLMPruner.plan import PruningPlan
from tolerance import assert_decoding_agrees, assert_paths_agree, assert_same

E, TOP_K = 16, 2
IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41]])
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=128, num_experts_per_tok=TOP_K, vocab_size=600,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = {  # the keyword each type spells its expert count with, and what else it needs
    "qwen3_moe": dict(num_experts=E, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(num_experts=E, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "mixtral": dict(num_local_experts=E),
    "olmoe": dict(num_experts=E),
    "gpt_oss": dict(num_local_experts=E, layer_types=["full_attention", "sliding_attention", "full_attention"],
                    sliding_window=4),
    "phimoe": dict(num_local_experts=E),
    "flex_olmo": dict(num_local_experts=E),
    "cohere2_moe": dict(num_experts=E),
    "glm4_moe": dict(n_routed_experts=E, first_k_dense_replace=1, moe_intermediate_size=16, n_group=1, topk_group=1,
                     norm_topk_prob=True),
    "minimax_m2": dict(num_local_experts=E),
    "hunyuan_v1_moe": dict(num_experts=E, moe_topk=TOP_K),
    "deepseek_v3": dict(n_routed_experts=E, first_k_dense_replace=1, moe_intermediate_size=16, n_group=2, topk_group=1,
                        q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                        num_key_value_heads=4, head_dim=4),  # latent attention: a KV head per head, rope width
    "deepseek_v2": dict(n_routed_experts=E, first_k_dense_replace=1, moe_intermediate_size=16, q_lora_rank=None,
                        kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
                        head_dim=4),
}
#: layers with a dense MLP in these configs
DENSE_LAYERS = {"qwen3_moe": [1], "glm4_moe": [0], "deepseek_v3": [0], "deepseek_v2": [0]}
#: routers whose top-k weights sum to one
RENORMALISING = ("qwen3_moe", "mixtral", "gpt_oss", "flex_olmo", "cohere2_moe", "glm4_moe", "hunyuan_v1_moe")


def build(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**BASE, **MOE[model_type]})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2 if p.dim() > 1 else torch.randn_like(p) * 0.02)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def calibration(n: int = 6, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 600, (n, seq), generator=torch.Generator().manual_seed(seed))


def moe_indices(model_type: str) -> list[int]:
    return [i for i in range(3) if i not in DENSE_LAYERS.get(model_type, [])]


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_layers_are_found_with_their_routers(model_type):
    model = build(model_type)
    layers = moe_layers(model)
    assert [m.index for m in layers] == moe_indices(model_type)
    assert all(m.num_experts == E and [tuple(p.shape) for p in m.router.parameters() if p.dim() == 2] == [(E, 32)]
               for m in layers)
    assert moe_layers(AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=64))) == []


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_frequency_counts_what_the_router_chose(model_type):
    model, ids = build(model_type), calibration()
    chosen = {}
    hooks = [m.router.register_forward_hook(
        lambda mod, args, out, i=m.index: chosen.setdefault(i, []).append(out[-1].reshape(-1)))
        for m in moe_layers(model)]
    logits(model, ids)
    for h in hooks:
        h.remove()
    scores = expert_scores(model, ids, "frequency")
    for i, picks in chosen.items():
        expected = torch.bincount(torch.cat(picks), minlength=E).double()
        torch.testing.assert_close(scores[i], expected)
        assert scores[i].sum() == ids.numel() * TOP_K


def test_reap_is_the_mean_router_weighted_output_norm_computed_by_hand():
    """Qwen3-MoE, layer 0: softmax over the router's logits, the top-2 renormalised; an expert's output is
    ``down_e(silu(gate_e x) * up_e x)``; REAP = mean over the tokens routed to e of weight x ||output||."""
    model, ids = build("qwen3_moe"), calibration(n=3)
    block = model.model.layers[0].mlp
    seen = []
    hook = block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, 32)))
    logits(model, ids)
    hook.remove()
    x = seen[0].double()
    probs = F.softmax(x @ block.gate.weight.double().T, dim=-1)
    top, index = probs.topk(TOP_K, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    total, count = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(TOP_K):
            e = int(index[t, j])
            gate, up = (block.experts.gate_up_proj[e].double() @ x[t]).chunk(2)
            out = block.experts.down_proj[e].double() @ (F.silu(gate) * up)
            total[e] += top[t, j] * out.norm()
            count[e] += 1
    expected = total / count.clamp_min(1)
    torch.testing.assert_close(expert_scores(model, ids, "reap")[0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", RENORMALISING)
def test_removing_experts_no_token_chose_keeps_the_logits(model_type):
    model, ids = build(model_type), IDS[:, :3]
    counts = expert_scores(model, ids, "frequency")
    keep = {}
    for i, c in counts.items():  # at most 3 tokens x 2 experts chosen: at least 10 of 16 idle
        idle = [e for e in range(E) if c[e] == 0]
        keep[i] = [e for e in range(E) if e not in idle[:8]]
    before = logits(model, ids)
    remove_experts(model, keep)
    assert_paths_agree(logits(model, ids), before)
    assert all(m.num_experts == E - 8 for m in moe_layers(model))


def test_a_router_without_renormalisation_shifts_weight_to_the_kept_experts():
    """OLMoE's weights are the softmax over all experts: removing idle ones changes the outputs a little
    (the documented behaviour), and what the kept experts compute is not otherwise touched."""
    model, ids = build("olmoe"), IDS[:, :3]
    counts = expert_scores(model, ids, "frequency")
    keep = {i: [e for e in range(E) if e not in [d for d in range(E) if c[d] == 0][:4]] for i, c in counts.items()}
    before = logits(model, ids)
    remove_experts(model, keep)
    after = logits(model, ids)
    assert not torch.allclose(after, before, atol=1e-5) and (after - before).abs().max() < before.abs().max()


@pytest.mark.parametrize("importance", ["reap", "frequency", "random"])
def test_the_same_lowest_scored_experts_count_leaves_every_layer(importance):
    model, ids = build("mixtral"), calibration()
    scores = expert_scores(model, ids, importance, seed=3)
    plan = choose_experts(model, 5, ids, importance, seed=3)
    for i, s in scores.items():
        gone = plan.removed_units[f"experts@{i}"]
        assert len(gone) == 5 and max(s[gone]) <= min(s[[e for e in range(E) if e not in gone]])
    remove_experts(model, kept_experts(plan, model))
    assert model.config.num_local_experts == E - 5 and model.num_experts == E - 5
    assert all(m.experts.gate_up_proj.shape[0] == E - 5 and m.router.weight.shape[0] == E - 5
               for m in moe_layers(model))


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_pruned_model_reloads_with_the_stock_class_and_generates(model_type, tmp_path):
    model, ids = build(model_type), calibration()
    plan = choose_experts(model, 6, ids, "reap")
    remove_experts(model, kept_experts(plan, model))
    expected = logits(model)
    save_pruned(model, None, tmp_path / "pruned")
    record = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert record["loader"] == "transformers"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert all(m.num_experts == E - 6 for m in moe_layers(stock))
    assert_paths_agree(logits(stock), expected)
    reloaded, _ = load_pruned(tmp_path / "pruned")
    assert_paths_agree(logits(reloaded), expected)
    out = stock.generate(IDS, use_cache=True, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    full = logits(stock, out.sequences)[0, IDS.shape[1] - 1:-1]
    assert_decoding_agrees(torch.cat(out.logits), full)


def test_a_saved_plan_replays_on_a_fresh_model():
    model, ids = build("qwen3_moe"), calibration()
    plan = choose_experts(model, 4, ids, "reap")
    remove_experts(model, kept_experts(plan, model))
    fresh = build("qwen3_moe")
    remove_experts(fresh, kept_experts(PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict()))), fresh))
    assert_same(logits(fresh), logits(model))


def test_counts_the_model_cannot_lose_are_refused():
    model = build("qwen3_moe")
    for bad in (0, E - TOP_K + 1, E):
        with pytest.raises(ExpertPruningError, match=f"--prune_experts {bad}: must be between 1 and {E - TOP_K}"):
            check_expert_count(model, bad)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=64))
    with pytest.raises(ExpertPruningError, match="model_type 'llama' has no mixture-of-experts layers"):
        check_expert_count(dense, 2)
    with pytest.raises(ExpertPruningError, match="--expert_importance 'magnitude'"):
        expert_scores(model, calibration(), "magnitude")
    with pytest.raises(ExpertPruningError, match="not distinct"):
        remove_experts(model, {0: [0, 0, 1], 2: [0, 1, 2]})


def test_pruning_the_width_of_an_moe_model_names_the_expert_flag():
    model = build("qwen3_moe")
    with pytest.raises(UnsupportedArchitectureError, match="mixture of experts.*--prune_experts"):
        prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="l2")


def _moe_folder(tmp_path, model_type="qwen3_moe"):
    from transformers import AutoTokenizer
    stories = need_shared("models", "stories260K")
    model = build(model_type)
    model.save_pretrained(tmp_path / "dense")
    AutoTokenizer.from_pretrained(stories).save_pretrained(tmp_path / "dense")  # 512 ids < 600
    return model, tmp_path / "dense"


def test_cli_removes_experts_saves_a_stock_checkpoint_and_evaluates(tmp_path):
    data = need_shared("data")
    dense, folder = _moe_folder(tmp_path)
    status, out, err = run_cli("hf_prune.py", [
        "--base_model", str(folder), "--prune_experts", "6", "--expert_importance", "reap",
        "--calibration_data", str(data / "c4" / "c4_demo.jsonl"), "--num_examples", "4",
        "--calibration_seq_len", "32", "--device", "cpu", "--eval_device", "cpu", "--save_model",
        "--test_after_train", "--eval_data_dir", str(data), "--ppl_datasets", "wikitext2", "--max_seq_len", "32",
        "--log_dir", str(tmp_path / "log"), "--save_ckpt_log_name", "experts"])
    assert status == 0, err[-3000:]
    run = tmp_path / "log" / "experts"
    results = json.loads((run / "results.json").read_text())
    per_expert = 3 * 16 * 32  # gate_up [2 x 16, 32] and down [32, 16]
    removed = 6 * (per_expert + 32) * 2  # two MoE layers, each expert's router row too
    assert results["params_before"] - results["params_after"] == removed
    assert results["ppl_after"]["wikitext2"] > 1
    plan = PruningPlan.from_dict(json.loads((run / "plan.json").read_text())[0])
    assert sorted(plan.removed_units) == ["experts@0", "experts@2"]
    stock = AutoModelForCausalLM.from_pretrained(run).eval()
    assert stock.config.num_experts == E - 6
    remove_experts(dense, kept_experts(plan, dense))  # the plan replays on the dense model
    assert_paths_agree(logits(stock), logits(dense))


def test_cli_refuses_width_pruning_of_moe_and_experts_of_dense_models_before_writing(tmp_path):
    stories = need_shared("models", "stories260K")
    data = need_shared("data")
    _, folder = _moe_folder(tmp_path)
    common = ["--device", "cpu", "--eval_device", "cpu", "--calibration_data", str(data / "c4" / "c4_demo.jsonl"),
              "--log_dir", str(tmp_path / "log"), "--save_ckpt_log_name", "run"]
    status, _, err = run_cli("hf_prune.py", ["--base_model", str(folder), "--pruning_ratio", "0.25"] + common)
    assert status != 0 and "mixture of experts" in err and "--prune_experts" in err and "Traceback" not in err
    status, _, err = run_cli("hf_prune.py", ["--base_model", str(stories), "--prune_experts", "2"] + common)
    assert status != 0 and "has no mixture-of-experts layers" in err and "Traceback" not in err
    status, _, err = run_cli("hf_prune.py", ["--base_model", str(folder), "--prune_experts", "15"] + common)
    assert status != 0 and "--prune_experts 15: must be between 1 and 14" in err
    status, _, err = run_cli("hf_prune.py", ["--base_model", str(folder), "--prune_experts", "2",
                                             "--compensation", "refit"] + common)
    assert status == 2 and "drop --compensation" in err
    assert not (tmp_path / "log").exists() or not any((tmp_path / "log").iterdir())


def test_macs_count_the_experts_each_token_runs_and_the_router():
    """Per token and MoE layer: top-k experts of 3 x 16 x 32 weights each, and the router's 16 x 32; removing
    experts shrinks only the router's share (expert pruning saves memory, not compute per token)."""
    from LLMPruner.evaluate.stats import count_macs
    model = build("qwen3_moe")
    macs = count_macs(model, 10)
    assert macs["experts"] == 10 * 2 * (TOP_K * 3 * 16 * 32 + E * 32)
    assert macs["total"] == macs["linear"] + macs["attention"] + macs["experts"]
    remove_experts(model, {i: list(range(4, E)) for i in (0, 2)})
    assert count_macs(model, 10)["experts"] == 10 * 2 * (TOP_K * 3 * 16 * 32 + (E - 4) * 32)


def test_group_limited_routing_loses_the_same_experts_count_in_every_group():
    """GLM-4.5 / DeepSeek-V3-style routers score contiguous groups of experts (n_group) and route within the
    best topk_group: each group loses the same number of its own lowest-scored experts, so the groups stay
    contiguous and equal, and the score-correction bias follows its experts."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("glm4_moe", **BASE, **{**MOE["glm4_moe"], "n_group": 4, "topk_group": 2})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2 if p.dim() > 1 else torch.randn_like(p) * 0.02)
        for moe in moe_layers(model):
            moe.router.e_score_correction_bias.copy_(torch.arange(E, dtype=torch.float32) / 100)
    ids = calibration()
    for bad in (2, 6, 12):  # not a multiple of the 4 groups, or fewer than 2 experts left in a group
        with pytest.raises(ExpertPruningError, match=f"--prune_experts {bad}: the router scores 4 groups of 4"):
            check_expert_count(model, bad)
    scores = expert_scores(model, ids, "reap")
    plan = choose_experts(model, 4, ids, "reap")
    for i, s in scores.items():
        gone = plan.removed_units[f"experts@{i}"]
        assert [g for g in range(4) for e in gone if e // 4 == g] == [0, 1, 2, 3]
        assert all(s[e] <= min(s[g * 4 + k] for k in range(4) if g * 4 + k not in gone)
                   for g in range(4) for e in gone if e // 4 == g)
    keep = kept_experts(plan, model)
    remove_experts(model, keep)
    for moe in moe_layers(model):
        expected = torch.tensor(keep[moe.index], dtype=torch.float32) / 100
        torch.testing.assert_close(moe.router.e_score_correction_bias, expected)
        assert moe.router.num_experts == E - 4 and moe.experts.num_experts == E - 4
    assert model.config.n_routed_experts == E - 4
    assert torch.isfinite(logits(model)).all()


# --- larger than the machine: --offload scores with accelerate's placement, then rewrites the checkpoint ---

@pytest.mark.parametrize("model_type", sorted(MOE))
def test_the_checkpoint_rewritten_on_disk_equals_the_model_pruned_in_memory(model_type, tmp_path):
    """Per-expert tensors on disk (renumbered), fused ones and the router's rows (sliced), shards and their
    index: the rewritten folder loads with the stock class and gives the in-memory result exactly."""
    from LLMPruner.experts.offload import rewrite_checkpoint
    model = build(model_type)
    model.save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    assert (tmp_path / "dense" / "model.safetensors.index.json").is_file()
    keep = kept_experts(choose_experts(model, 6, calibration(), "reap"), model)
    remove_experts(model, keep)
    counts = rewrite_checkpoint(tmp_path / "dense", tmp_path / "out", keep, E)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_paths_agree(logits(stock), logits(model))
    buffers = sum(b.numel() for n, b in model.named_buffers() if "correction_bias" in n)  # saved, not parameters
    assert counts["params_after"] == sum(p.numel() for p in model.parameters()) + buffers
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in (tmp_path / "out").glob("*.safetensors")}


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_the_fused_copy_converted_layer_by_layer_is_the_same_model(model_type, tmp_path):
    """--offload scores a copy of the checkpoint under the model's own names (experts fused), which
    transformers converts one layer at a time: it loads with the stock class and gives the same logits."""
    from LLMPruner.experts.offload import fused_copy
    model = build(model_type)
    model.save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    fused_copy(tmp_path / "dense", tmp_path / "fused", torch.float32)
    assert not list((tmp_path / "fused").glob(".layer-*"))  # the one-layer checkpoints are gone
    names = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(re.search(r"\.experts\.\d+\.", n) for n in names)  # no per-expert tensor left
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert_paths_agree(logits(stock), logits(model))


def test_a_rewrite_that_cannot_find_a_layers_experts_fails_naming_it(tmp_path):
    from LLMPruner.experts.offload import rewrite_checkpoint
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "dense")
    keep = {0: list(range(10)), 1: list(range(10)), 2: list(range(10))}  # layer 1 is a dense MLP
    with pytest.raises(ExpertPruningError, match=r"layer 1: experts, layer 1: router"):
        rewrite_checkpoint(tmp_path / "dense", tmp_path / "out", keep, E)


def test_cli_offload_scores_from_disk_and_writes_what_the_in_memory_run_writes(tmp_path):
    data = need_shared("data")
    _, folder = _moe_folder(tmp_path, "mixtral")
    common = ["--base_model", str(folder), "--prune_experts", "5", "--calibration_data",
              str(data / "c4" / "c4_demo.jsonl"), "--num_examples", "4", "--calibration_seq_len", "32", "--device",
              "cpu", "--eval_device", "cpu", "--log_dir", str(tmp_path / "log")]
    status, _, err = run_cli("hf_prune.py", common + ["--save_model", "--save_ckpt_log_name", "memory"])
    assert status == 0, err[-3000:]
    status, _, err = run_cli("hf_prune.py", common + ["--offload", "--max_memory", "100KB",
                                                      "--save_ckpt_log_name", "disk"])
    assert status == 0, err[-3000:]
    results = json.loads((tmp_path / "log" / "disk" / "results.json").read_text())
    assert "disk" in results["placement"].split(", ")  # 100 KB: accelerate kept layers on disk
    assert not list((tmp_path / "log").glob(".offload-*"))  # the accelerate offload folder is gone
    plans = [json.loads((tmp_path / "log" / run / "plan.json").read_text()) for run in ("memory", "disk")]
    assert plans[0] == plans[1]
    memory, _ = load_pruned(tmp_path / "log" / "memory")
    disk, _ = load_pruned(tmp_path / "log" / "disk")  # pruning.json's checksums verified
    assert disk.config.num_local_experts == E - 5
    assert_paths_agree(logits(disk), logits(memory))
    assert results["experts_per_layer"] == E - 5 and results["params_after"] < results["params_before"]
    status, _, err = run_cli("hf_prune.py", common + ["--offload", "--dtype", "bfloat16", "--save_ckpt_log_name", "bf16"])
    assert status == 0, err[-3000:]
    from safetensors import safe_open  # written in --dtype, as the in-memory run saves
    with safe_open(str(tmp_path / "log" / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
