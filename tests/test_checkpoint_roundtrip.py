"""Save -> load round-trips: identical logits and generations for block-wise (heterogeneous),
channel-wise and layer-wise results, with LLMPruner and with stock transformers alone."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import STORIES, need_shared, tiny_model
from LLMPruner.adapters import get_adapter
from LLMPruner.checkpoint import load_model, load_pruned, save_pruned
from tolerance import assert_same

torch.set_num_threads(1)


# ---- helpers: prune by hand (index_select on the right dims), independent of LLMPruner's pruner ----

def _slice(linear: nn.Linear, rows=None, cols=None) -> None:
    w = linear.weight.data
    b = linear.bias.data if linear.bias is not None else None
    if rows is not None:
        rows = torch.as_tensor(rows)
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, torch.as_tensor(cols))
    linear.weight = nn.Parameter(w.contiguous())
    if b is not None:
        linear.bias = nn.Parameter(b.contiguous())
    linear.out_features, linear.in_features = linear.weight.shape


def shrink_layer(model, i: int, kv_keep: list[int] | None = None, mlp_keep: list[int] | None = None) -> None:
    """Keep KV groups ``kv_keep`` (each with its query heads) and MLP channels ``mlp_keep`` of layer i."""
    config = model.config
    attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
    hd = config.head_dim
    if kv_keep is not None:
        rep = attn.q_proj.out_features // attn.k_proj.out_features
        q_heads = [g * rep + r for g in kv_keep for r in range(rep)]
        q_rows = [h * hd + d for h in q_heads for d in range(hd)]
        kv_rows = [g * hd + d for g in kv_keep for d in range(hd)]
        _slice(attn.q_proj, rows=q_rows)
        _slice(attn.k_proj, rows=kv_rows)
        _slice(attn.v_proj, rows=kv_rows)
        _slice(attn.o_proj, cols=q_rows)
    if mlp_keep is not None:
        _slice(mlp.gate_proj, rows=mlp_keep)
        _slice(mlp.up_proj, rows=mlp_keep)
        _slice(mlp.down_proj, cols=mlp_keep)


def shrink_hidden(model, keep: list[int]) -> None:
    """Channel-wise: keep hidden channels ``keep`` everywhere (embedding, norms, every projection)."""
    idx = torch.as_tensor(keep)
    emb = model.model.embed_tokens
    emb.weight = nn.Parameter(emb.weight.data.index_select(1, idx).contiguous())
    for norm in [model.model.norm] + [n for l in model.model.layers for n in (l.input_layernorm,
                                                                             l.post_attention_layernorm)]:
        norm.weight = nn.Parameter(norm.weight.data.index_select(0, idx).contiguous())
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _slice(lin, cols=keep)
        for lin in (a.o_proj, m.down_proj):
            _slice(lin, rows=keep)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = emb.weight
    else:
        _slice(model.lm_head, cols=keep)


def block_wise(model):
    """Heterogeneous: layer 0 loses a KV group and MLP channels, the last layer only MLP channels."""
    inter = model.config.intermediate_size
    shrink_layer(model, 0, kv_keep=[1], mlp_keep=list(range(0, inter, 2)))
    shrink_layer(model, model.config.num_hidden_layers - 1, mlp_keep=list(range(inter // 3)))
    get_adapter(model).update_config(model)
    return model


def channel_wise(model):
    shrink_hidden(model, [c for c in range(model.config.hidden_size) if c % 4 != 1])
    get_adapter(model).update_config(model)
    return model


def layer_wise(model):
    get_adapter(model).keep_decoder_layers(model, [0, model.config.num_hidden_layers - 1])
    get_adapter(model).update_config(model)
    return model


PRUNERS = {"block_wise": block_wise, "channel_wise": channel_wise, "layer_wise": layer_wise}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


IDS = torch.tensor([[1, 5, 9, 3, 17, 30, 2, 8]])


# ---- tests ----

@pytest.mark.parametrize("mode", list(PRUNERS))
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_roundtrip_tiny(tmp_path, mode, model_type):
    model = PRUNERS[mode](tiny_model(model_type))
    folder = save_pruned(model, None, tmp_path / "ckpt", provenance={"base_model": "tiny", "mode": mode})
    loaded, tokenizer = load_pruned(folder, attn_implementation="eager")  # as tiny_model: exact equality
    assert tokenizer is None
    assert_same(logits(loaded, IDS), logits(model, IDS))
    assert torch.equal(greedy(loaded, IDS), greedy(model, IDS))
    assert get_adapter(loaded).read_structure(loaded) == get_adapter(model).read_structure(model)
    record = json.loads((folder / "pruning.json").read_text())
    assert record["provenance"] == {"base_model": "tiny", "mode": mode}
    assert record["structure"] == get_adapter(model).read_structure(model).to_dict()
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    heterogeneous = mode == "block_wise"
    assert (folder / "modeling_pruned.py").exists() == heterogeneous
    assert ("layer_shapes" in json.loads((folder / "config.json").read_text())) == heterogeneous


@pytest.mark.parametrize("mode", ["channel_wise", "layer_wise"])
def test_uniform_loads_with_stock_transformers(tmp_path, mode):
    from transformers import AutoModelForCausalLM
    model = PRUNERS[mode](tiny_model())
    folder = save_pruned(model, None, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["LlamaForCausalLM"]
    stock = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(stock).__name__ == "LlamaForCausalLM"
    assert_same(logits(stock, IDS), logits(model, IDS))


def test_heterogeneous_loads_with_stock_transformers_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM
    model = block_wise(tiny_model())
    folder = save_pruned(model, None, tmp_path / "ckpt")
    stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(stock).__name__ == "PrunedLlamaForCausalLM"
    assert "LLMPruner" not in type(stock).__module__
    assert_same(logits(stock, IDS), logits(model, IDS))
    assert torch.equal(greedy(stock, IDS), greedy(model, IDS))


def test_heterogeneous_without_remote_code_fails_loudly(tmp_path):
    from transformers import AutoModelForCausalLM
    folder = save_pruned(block_wise(tiny_model()), None, tmp_path / "ckpt")
    with pytest.raises(Exception, match="(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)


def test_dtype_and_device_map(tmp_path):
    model = block_wise(tiny_model())
    folder = save_pruned(model, None, tmp_path / "ckpt")
    half, _ = load_pruned(folder, device_map="auto", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(half, IDS).float(), logits(model, IDS), rtol=0.1, atol=0.1)
    cpu, _ = load_pruned(folder, device_map={"": "cpu"}, torch_dtype="float32", attn_implementation="eager")
    assert_same(logits(cpu, IDS), logits(model, IDS))


def test_prune_again_and_resave(tmp_path):
    """A loaded heterogeneous model is an ordinary model: prune it further, save, load."""
    model = block_wise(tiny_model())
    first, _ = load_pruned(save_pruned(model, None, tmp_path / "a"), attn_implementation="eager")
    shrink_layer(first, 1, kv_keep=[0])
    get_adapter(first).update_config(first)
    again, _ = load_pruned(save_pruned(first, None, tmp_path / "b"), attn_implementation="eager")
    assert_same(logits(again, IDS), logits(first, IDS))
    assert [s.num_key_value_heads for s in get_adapter(again).read_structure(again).layers] == [1, 1, 2]


def test_sharded_save(tmp_path):
    model = block_wise(tiny_model())
    folder = save_pruned(model, None, tmp_path / "ckpt", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    loaded, _ = load_pruned(folder, attn_implementation="eager")
    assert_same(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.parametrize("mode", list(PRUNERS))
def test_roundtrip_stories260k(tmp_path, mode):
    need_shared("models", "stories260K")
    model, tokenizer = load_model(STORIES)
    model = PRUNERS[mode](model)
    folder = save_pruned(model, tokenizer, tmp_path / "ckpt", provenance={"base_model": str(STORIES)})
    loaded, tok = load_model(folder)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer("Once upon a time", return_tensors="pt").input_ids.tolist()
    assert_same(logits(loaded, ids), logits(model, ids))
    assert torch.equal(greedy(loaded, ids, 20), greedy(model, ids, 20))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied embeddings stay tied
    assert (folder / "generation_config.json").exists()


def test_unpruned_stories_is_a_plain_checkpoint(tmp_path):
    need_shared("models", "stories260K")
    from transformers import AutoModelForCausalLM
    model, tokenizer = load_model(STORIES)
    folder = save_pruned(model, tokenizer, tmp_path / "ckpt")
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    assert_same(logits(stock, ids), logits(model, ids))


def test_lora_on_a_loaded_pruned_model_merges_and_saves(tmp_path):
    """post_training's path: LoRA on a loaded heterogeneous model, merge, save, load."""
    from peft import LoraConfig, get_peft_model
    pruned, _ = load_pruned(save_pruned(block_wise(tiny_model()), None, tmp_path / "a"),
                            attn_implementation="eager")
    lora = get_peft_model(pruned, LoraConfig(r=4, target_modules=list(get_adapter(pruned).lora_target_modules)))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged = lora.merge_and_unload()
    folder = save_pruned(merged, None, tmp_path / "b", provenance={"lora": True})
    loaded, _ = load_pruned(folder, attn_implementation="eager")
    assert_same(logits(loaded, IDS), logits(merged, IDS))
    assert not any("lora" in k for k in loaded.state_dict())
