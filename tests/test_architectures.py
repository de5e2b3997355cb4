"""Every supported architecture, one shared test body: tiny random models built in code from configs.

For each: discovery finds the expected coupling, removing zeroed groups keeps the logits, every pruning
mode leaves a model that generates (with and without the KV cache, the same tokens), the pruned model
reloads identically, and it takes LoRA. To add an architecture, add one entry to ``ARCHS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from LLMPruner.adapters import UnsupportedArchitectureError, get_adapter, supported_model_types
from LLMPruner.discover import discover
from LLMPruner.prune import prune
from LLMPruner.select.units import make_plan
from LLMPruner.shrink import apply_plan
from LLMPruner.structure import ModelStructure
from tolerance import assert_decoding_agrees, assert_paths_agree, assert_same

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41]])
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
LLAMA_ATTN = {"q_proj.weight": 16, "k_proj.weight": 8, "v_proj.weight": 8, "o_proj.weight": 16}
LLAMA_MLP = {"gate_proj.weight": 1, "up_proj.weight": 1, "down_proj.weight": 1}


@dataclass
class Arch:
    config: dict
    attention: dict[str, int]  # member "module.param" -> indices per unit, in one attention unit
    mlp: dict[str, int]
    n_attention: int = 2       # units per layer: KV heads (GQA) or heads (MHA)
    n_mlp: int = 48
    #: a uniform pruning a stock ``from_pretrained`` can rebuild (see docs/adding_an_architecture.md)
    reload: dict = field(default_factory=lambda: dict(mode="channel_wise", pruning_ratio=0.25))


ARCHS = {
    "llama": Arch(LLAMA_LIKE, LLAMA_ATTN, LLAMA_MLP),
    "mistral": Arch(LLAMA_LIKE, LLAMA_ATTN, LLAMA_MLP),
    # LLaMA names with scalar multipliers on embeddings, residuals, attention and logits
    "granite": Arch({**LLAMA_LIKE, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                     "attention_multiplier": 0.3, "logits_scaling": 4.0}, LLAMA_ATTN, LLAMA_MLP),
    "qwen2": Arch(LLAMA_LIKE, {**LLAMA_ATTN, "q_proj.bias": 16, "k_proj.bias": 8, "v_proj.bias": 8}, LLAMA_MLP),
    # q_norm/k_norm [head_dim] are shared by all heads: in no group
    "qwen3": Arch(LLAMA_LIKE, LLAMA_ATTN, LLAMA_MLP),
    # head_dim 12 != hidden 32 / 4 heads
    "gemma": Arch({**LLAMA_LIKE, "head_dim": 12},
                  {"q_proj.weight": 24, "k_proj.weight": 12, "v_proj.weight": 12, "o_proj.weight": 24}, LLAMA_MLP),
    "gemma2": Arch({**LLAMA_LIKE, "head_dim": 12, "sliding_window": 4, "query_pre_attn_scalar": 12},
                   {"q_proj.weight": 24, "k_proj.weight": 12, "v_proj.weight": 12, "o_proj.weight": 24}, LLAMA_MLP),
    # Gemma-3's text model: per-head q/k norms (shared), local and global RoPE bases by layer type
    "gemma3_text": Arch({**LLAMA_LIKE, "head_dim": 12, "sliding_window": 4, "query_pre_attn_scalar": 12,
                         "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
                        {"q_proj.weight": 24, "k_proj.weight": 12, "v_proj.weight": 12, "o_proj.weight": 24},
                        LLAMA_MLP),
    "ministral": Arch({**LLAMA_LIKE, "sliding_window": 4,
                       "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, LLAMA_ATTN,
                      LLAMA_MLP),
    # layers 0 and 2 use RoPE, layer 1 does not (NoPE)
    "smollm3": Arch({**LLAMA_LIKE, "no_rope_layers": [1, 0, 1], "pad_token_id": 0}, LLAMA_ATTN, LLAMA_MLP),
    # post-norms, per-head q/k norms, sliding and full layers
    "exaone4": Arch({**LLAMA_LIKE, "sliding_window": 4,
                     "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, LLAMA_ATTN,
                    LLAMA_MLP),
    # parallel attention and MLP on one LayerNorm, logit scale, tied embeddings in the real checkpoints
    "cohere2": Arch({**LLAMA_LIKE, "sliding_window": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                     "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, LLAMA_ATTN,
                    LLAMA_MLP),
    "hunyuan_v1_dense": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, LLAMA_ATTN,
                             LLAMA_MLP),
    "seed_oss": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                     {**LLAMA_ATTN, "q_proj.bias": 16, "k_proj.bias": 8, "v_proj.bias": 8}, LLAMA_MLP),
    # q_norm / k_norm span all heads: each head's slice of them is in its group, and the kept slices are
    # rescaled (exact up to the norm's epsilon, which tiny random activations would make matter: 1e-12)
    "olmo2": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-12},
                  {**LLAMA_ATTN, "q_norm.weight": 16, "k_norm.weight": 8}, LLAMA_MLP),
    "olmo3": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-12,
                   "sliding_window": 4,
                   "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
                  {**LLAMA_ATTN, "q_norm.weight": 16, "k_norm.weight": 8}, LLAMA_MLP),
    # LLaMA names, details tracing handles (defaults of each config)
    **{t: Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, LLAMA_ATTN, LLAMA_MLP)
       for t in ("ministral3", "cohere", "internlm3", "ernie4_5", "cwm", "iquestcoder", "hyperclovax")},
    # the stock Helium builds o_proj as hidden x hidden: from_pretrained rebuilds MLP-only pruning only
    "helium": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, LLAMA_ATTN, LLAMA_MLP,
                   reload=dict(mode="block_wise", pruning_ratio=0.5, mlp_layers=range(0, 3))),
    "vaultgemma": Arch({**LLAMA_LIKE, "head_dim": 12, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                       {"q_proj.weight": 24, "k_proj.weight": 12, "v_proj.weight": 12, "o_proj.weight": 24},
                       LLAMA_MLP),
    # two-projection MLPs (up -> activation -> down)
    "arcee": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, LLAMA_ATTN,
                  {"up_proj.weight": 1, "down_proj.weight": 1}),
    "apertus": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, LLAMA_ATTN,
                    {"up_proj.weight": 1, "down_proj.weight": 1}),
    "nemotron": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, LLAMA_ATTN,
                     {"up_proj.weight": 1, "down_proj.weight": 1}),
    "jais2": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                  {**LLAMA_ATTN, "q_proj.bias": 16, "k_proj.bias": 8, "v_proj.bias": 8},
                  {"up_proj.weight": 1, "up_proj.bias": 1, "down_proj.weight": 1}),
    # one learned attention-sink logit per query head, kept with its head
    "granite_swa": Arch({**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                        {**LLAMA_ATTN, "self_attn.sinks": 2}, LLAMA_MLP),
    # fused: per KV group, 16 q rows + 8 k rows + 8 v rows of qkv_proj; gate_up row i pairs with row 48 + i
    "phi3": Arch({**LLAMA_LIKE, "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1},
                 {"qkv_proj.weight": 32, "o_proj.weight": 16}, {"gate_up_proj.weight": 2, "down_proj.weight": 1}),
    "glm": Arch({**LLAMA_LIKE, "pad_token_id": 0, "eos_token_id": 2},
                {**LLAMA_ATTN, "q_proj.bias": 16, "k_proj.bias": 8, "v_proj.bias": 8},
                {"gate_up_proj.weight": 2, "down_proj.weight": 1}),
    # GLM-4-0414: GLM plus post-attention and post-MLP norms
    "glm4": Arch({**LLAMA_LIKE, "pad_token_id": 0, "eos_token_id": 2},
                 {**LLAMA_ATTN, "q_proj.bias": 16, "k_proj.bias": 8, "v_proj.bias": 8},
                 {"gate_up_proj.weight": 2, "down_proj.weight": 1}),
    # MHA with biases everywhere; head_dim is hidden/heads in the stock model: reload MLP-only pruning
    "opt": Arch(dict(hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=32,
                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                {f"{p}.{w}": 8 for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")}
                | {"out_proj.weight": 8},
                {"fc1.weight": 1, "fc1.bias": 1, "fc2.weight": 1}, n_attention=4,
                reload=dict(mode="block_wise", pruning_ratio=0.5, mlp_layers=range(0, 3))),
    # fused per-head interleaved qkv: 3 x 8 rows per head, and the head's ALiBi slope; MLP is 4 * hidden
    "bloom": Arch(dict(hidden_size=32, n_layer=3, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                  {"query_key_value.weight": 24, "query_key_value.bias": 24, "dense.weight": 8,
                   "self_attention.alibi_slopes": 1},
                  {"dense_h_to_4h.weight": 1, "dense_h_to_4h.bias": 1, "dense_4h_to_h.weight": 1},
                  n_attention=4, n_mlp=128, reload=dict(mode="layer_wise", layer=2)),
}


def build(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=64, tie_word_embeddings=False, **ARCHS[model_type].config)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def short(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def zero_units(model, family, units) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m in family.members:
            params[m.param].index_fill_(m.dim, m.indices[units].reshape(-1), 0.0)


def assert_generates(model, new: int = 5) -> None:
    """Greedy decoding with the KV cache scores each step as a full forward of the sequence does."""
    out = model.generate(IDS, use_cache=True, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, IDS.shape[1] + new)
    full = logits(model, out.sequences)[0, IDS.shape[1] - 1:-1]  # [new, vocab]
    assert_decoding_agrees(torch.cat(out.logits), full)


ALL = sorted(ARCHS)


def test_every_supported_architecture_is_tested():
    """Every adapter that prunes widths is tested here; the mixture-of-experts ones (whole experts only)
    in tests/test_experts.py."""
    from test_experts import MOE
    assert [t for t in supported_model_types() if not get_adapter_for(t).experts_only] == ALL
    assert sorted(t for t in supported_model_types() if get_adapter_for(t).experts_only) == sorted(MOE)


def get_adapter_for(model_type: str):
    from LLMPruner.adapters import _ADAPTERS
    return _ADAPTERS[model_type]


@pytest.mark.parametrize("model_type", ALL)
def test_discovered_groups(model_type):
    arch, model = ARCHS[model_type], build(model_type)
    found = discover(model)
    assert sorted(f.key for f in found.families) == sorted(
        ["hidden"] + [f"{k}@{i}" for k in ("attention", "mlp") for i in range(3)]), found.describe()
    for i in range(3):
        attn, mlp = found.find("attention", i)[0], found.find("mlp", i)[0]
        assert attn.n_units == arch.n_attention and mlp.n_units == arch.n_mlp
        assert {short(m.param): m.indices.shape[1] for m in attn.members} == arch.attention
        assert {short(m.param): m.indices.shape[1] for m in mlp.members} == arch.mlp
    hidden = found.find("hidden")[0]
    assert hidden.n_units == 32 and all(m.indices.shape[1] == 1 for m in hidden.members)
    assert len(found.layers) == 3


@pytest.mark.parametrize("model_type", ALL)
def test_removing_zeroed_groups_keeps_logits(model_type):
    model = build(model_type)
    found = discover(model)
    removed = {"attention@1": [0], "mlp@1": [3, 7, 20], "mlp@2": list(range(0, 48, 2)), "attention@2": [1]}
    targets = [f for f in found.families if f.key in removed]
    for fam in targets:
        zero_units(model, fam, removed[fam.key])
    before = logits(model)
    structure = apply_plan(model, make_plan(model, targets, removed))
    heads = ARCHS[model_type].n_attention
    assert structure.layers[0].num_key_value_heads == heads
    assert structure.layers[1].num_key_value_heads == heads - 1
    assert structure.layers[2].intermediate_size == ARCHS[model_type].n_mlp - 24
    assert_paths_agree(logits(model), before)
    assert_generates(model)


@pytest.mark.parametrize("model_type", ALL)
@pytest.mark.parametrize("mode", ["block_wise", "channel_wise", "layer_wise"])
def test_every_mode_prunes_and_generates(model_type, mode):
    model = build(model_type)
    n = sum(p.numel() for p in model.parameters())
    kwargs = dict(block_wise=dict(pruning_ratio=0.5, attention_layers=range(1, 3), mlp_layers=range(1, 3)),
                  channel_wise=dict(pruning_ratio=0.25), layer_wise=dict(layer=2))[mode]
    structure = prune(model, mode=mode, pruner_type="l2", **kwargs).structure
    assert sum(p.numel() for p in model.parameters()) < n
    assert structure == get_adapter(model).read_structure(model)
    assert logits(model).isfinite().all()
    assert_generates(model)


@pytest.mark.parametrize("model_type", ALL)
def test_uniform_pruning_reloads_with_from_pretrained(model_type, tmp_path):
    model = build(model_type)
    prune(model, pruner_type="l2", **ARCHS[model_type].reload)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    get_adapter(again).prepare(again)  # restores what the stock model cannot rebuild (ALiBi, embed scale)
    assert_paths_agree(logits(again), logits(model))


@pytest.mark.parametrize("model_type", ALL)
def test_heterogeneous_pruning_rebuilds_with_resize_layer(model_type):
    """What a checkpoint loader does: build from the pruned config, resize each layer, load strictly."""
    model = build(model_type)
    prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="l1",
          attention_layers=range(1, 3), mlp_layers=range(0, 2))
    adapter = get_adapter(model)
    structure = adapter.read_structure(model)
    assert not structure.is_uniform() and len(model.config.layer_shapes) == 3
    again = AutoModelForCausalLM.from_config(model.config).eval()
    for layer, shape in zip(adapter.decoder_layers(again), structure.layers):
        adapter.resize_layer(layer, shape, structure.hidden_size, structure.head_dim)
    adapter.prepare(again)
    again.load_state_dict(model.state_dict(), strict=True)
    assert_paths_agree(logits(again), logits(model))
    assert_generates(again)


@pytest.mark.parametrize("model_type", ALL)
def test_pruned_model_takes_lora(model_type):
    from peft import LoraConfig, get_peft_model
    model = build(model_type)
    prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="l2",
          attention_layers=range(1, 3), mlp_layers=range(1, 3))
    targets = list(get_adapter(model).lora_target_modules)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    peft_model.train()
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert len(trained) == 2 * 3 * len(targets)  # lora_A and lora_B on every target of every layer
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters()
               if "lora_B" in n)


def test_unsupported_architecture_lists_every_supported_one():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*supported: " + ", ".join(supported_model_types())):
        discover(model)


@pytest.mark.parametrize("model_type", ALL)
def test_depth_pruning_reloads_with_from_pretrained(model_type, tmp_path):
    """Dropping the first layer renumbers the layers and every per-layer list of the config (layer types,
    SmolLM3's NoPE layers): the stock model rebuilt from the saved config gives the same logits."""
    from LLMPruner.checkpoint import load_pruned, save_pruned
    from LLMPruner.plan import PruningPlan
    model = build(model_type)
    apply_plan(model, PruningPlan(keep_layers=[1, 2]))
    assert len(get_adapter(model).decoder_layers(model)) == 2
    model.save_pretrained(tmp_path / "stock")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    get_adapter(again).prepare(again)
    assert_paths_agree(logits(again), logits(model))
    save_pruned(model, None, tmp_path / "ckpt")
    assert_paths_agree(logits(load_pruned(tmp_path / "ckpt")[0]), logits(model))
    assert_generates(again)


def test_structure_round_trips_as_json():
    model = build("phi3")
    prune(model, mode="block_wise", pruning_ratio=0.5, attention_layers=range(1, 2), mlp_layers=range(1, 2))
    structure = get_adapter(model).read_structure(model)
    assert ModelStructure.from_dict(structure.to_dict()) == structure


def test_qwen3_head_norms_are_shared_by_all_heads_and_in_no_group():
    found = discover(build("qwen3"))
    members = {m.param for f in found.families for m in f.members}
    assert not any("q_norm" in p or "k_norm" in p for p in members)


def test_bloom_layer_alibi_matches_the_stock_model_with_left_padding():
    model = build("bloom")
    ids = torch.tensor([[0, 0, 5, 9, 13], [3, 4, 5, 9, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        get_adapter(model).prepare(model)  # per-layer slopes + the pre-hook that rebuilds ALiBi from them
        assert [len(s) for s in [b.self_attention.alibi_slopes for b in model.transformer.h]] == [4, 4, 4]
        assert_paths_agree(model(ids, attention_mask=mask).logits, stock)


def test_opt_word_embedding_projection_is_not_the_hidden_size():
    """OPT-350m embeds in 16 dims and projects in/out of a 32-dim residual stream: only the stream is
    "hidden"; the embedding space is found but left alone (kind "unknown")."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", vocab_size=64, **{**ARCHS["opt"].config, "word_embed_proj_dim": 16,
                                                            "do_layer_norm_before": False})
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    found = discover(model)
    assert [f.n_units for f in found.find("hidden")] == [32]
    assert [f.n_units for f in found.find("unknown")] == [16]
    structure = prune(model, mode="channel_wise", pruning_ratio=0.25, pruner_type="l2").structure
    assert structure.hidden_size == 24 and model.config.word_embed_proj_dim == 16
    assert_generates(model)


@pytest.mark.parametrize("model_type", ALL)
@pytest.mark.parametrize("mode", ["block_wise", "channel_wise"])
def test_save_pruned_then_load_pruned_is_identical(model_type, mode, tmp_path):
    """The project's checkpoint format, heterogeneous layers included, for every architecture."""
    from LLMPruner.checkpoint import load_pruned, save_pruned
    model = build(model_type)
    kwargs = dict(block_wise=dict(pruning_ratio=0.5, attention_layers=range(1, 3), mlp_layers=range(0, 2)),
                  channel_wise=dict(pruning_ratio=0.25))[mode]
    prune(model, mode=mode, pruner_type="l1", **kwargs)
    save_pruned(model, None, tmp_path / "ckpt")
    again, _ = load_pruned(tmp_path / "ckpt")
    assert_paths_agree(logits(again), logits(model))
    assert_generates(again)


@pytest.mark.parametrize("kwargs", [dict(pruner_type="l2"), dict(pruner_type="wanda", compensation="refit")])
def test_olmo2_head_norms_are_rescaled_once_in_memory_under_offload_and_on_replay(kwargs, tmp_path):
    """OLMo-2's q_norm / k_norm average over all heads. Slicing (in one go, or consumer by consumer in the
    refit pass, or layer by layer under --offload) multiplies each kept slice by sqrt(old / new width) once;
    the streamed pass and a replay of the plan on a fresh model give the same weights."""
    from LLMPruner.plan import PruningPlan
    from LLMPruner.stream.pipeline import prune_offloaded
    from test_offload import _tensors
    from LLMPruner.checkpoint import save_pruned
    examples = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    common = dict(pruning_ratio=0.5, attention_layers=range(0, 3), mlp_layers=range(1, 3), examples=examples,
                  calibration_batch_size=4, **kwargs)
    dense, model = build("olmo2"), build("olmo2")
    result = prune(model, **common)
    for norm, width in (("q_norm", 32), ("k_norm", 16)):  # 1 of 2 KV groups (with its 2 query heads) removed
        name = f"model.layers.0.self_attn.{norm}.weight"
        kept = result.plans[0].keep[name][0]
        assert len(kept) == width // 2
        torch.testing.assert_close(model.get_parameter(name), dense.get_parameter(name)[kept] * 2 ** 0.5)
    save_pruned(model, None, tmp_path / "mem")
    prune_offloaded(build("olmo2"), save_to=tmp_path / "off", **common)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "off")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    fresh = build("olmo2")
    for plan in result.plans:
        apply_plan(fresh, PruningPlan.from_dict(plan.to_dict()))
    for n, p in fresh.named_parameters():
        if "norm" in n:
            assert_same(p, model.get_parameter(n), msg=n)


def test_cohere_with_per_head_qk_norms_is_refused_before_loading():
    """Command R+ (use_qk_norm) keeps a [heads, head_dim] LayerNorm weight per projection, which tracing does
    not slice with the heads: refused from the config alone, naming the option; Command R is supported."""
    config = AutoConfig.for_model("cohere", vocab_size=64, **LLAMA_LIKE, use_qk_norm=True)
    with pytest.raises(UnsupportedArchitectureError, match="use_qk_norm=True .*Command R without use_qk_norm"):
        get_adapter(config)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="use_qk_norm"):
        discover(model)
