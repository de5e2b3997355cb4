"""Merging LoRA into pruned weights: merged == unmerged peft logits, and the saved folder reloads identically."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_recover_data import char_tokenizer

import LLMPruner.checkpoint as checkpoint
from LLMPruner.adapters import get_adapter
from LLMPruner.recover import RecoveryConfig, merge_adapter, merge_lora, save_merged, wrap_lora
from tolerance import assert_paths_agree


def slice_layer(model, index: int, kv_heads: list[int], channels: list[int]) -> None:
    """Keep whole KV groups (with their query heads) and some MLP channels of one decoder layer."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    d = config.head_dim
    layer = get_adapter(model).decoder_layers(model)[index]
    kv_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kv_heads])
    q_rows = torch.cat([torch.arange(q * d, (q + 1) * d) for h in kv_heads for q in range(h * group, (h + 1) * group)])
    ch = torch.tensor(channels)
    attn, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        for lin, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows),
                          (mlp.gate_proj, ch), (mlp.up_proj, ch)):
            lin.weight = torch.nn.Parameter(lin.weight.index_select(0, rows))
            lin.out_features = rows.numel()
        for lin, cols in ((attn.o_proj, q_rows), (mlp.down_proj, ch)):
            lin.weight = torch.nn.Parameter(lin.weight.index_select(1, cols))
            lin.in_features = cols.numel()


def pruned_model(layers: list[int]):
    model = tiny_model(vocab_size=128, seed=3)
    for i in layers:
        slice_layer(model, i, kv_heads=[1], channels=list(range(0, 48, 2)))
    get_adapter(model).update_config(model)
    return model


def pruned_lora_model(layers: list[int] | None = None, model=None):
    model = pruned_model(layers) if model is None else model
    peft_model = wrap_lora(model, RecoveryConfig(lora_target_modules=list(get_adapter(model).lora_target_modules)))
    with torch.no_grad():  # LoRA B starts at zero: give the update some weight so merging means something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft_model.eval()


IDS = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))


def test_merged_logits_equal_unmerged_peft_logits_on_heterogeneous_layers():
    peft_model = pruned_lora_model(layers=[1])
    with torch.no_grad():
        expected = peft_model(IDS).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            no_lora = peft_model(IDS).logits
    assert (expected - no_lora).abs().max() > 1e-2  # the adapter changes the output
    merged = merge_lora(peft_model)
    assert merged is base and not any("lora_" in n for n, _ in merged.named_parameters())
    assert [s.num_attention_heads for s in get_adapter(merged).read_structure(merged).layers] == [4, 2, 4]
    with torch.no_grad():
        assert_paths_agree(merged(IDS).logits, expected)


def reload_logits(folder) -> torch.Tensor:
    model, _ = checkpoint.load_model(str(folder), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_merged_model_reloads_from_disk_identically(tmp_path):
    peft_model = pruned_lora_model(layers=[0, 1, 2])  # uniformly pruned: any loader reads it
    with torch.no_grad():
        expected = peft_model(IDS).logits
    folder = save_merged(peft_model, char_tokenizer(), tmp_path / "merged")
    assert_paths_agree(reload_logits(folder), expected)


def test_heterogeneous_merged_model_reloads_from_disk_identically(tmp_path):
    if not hasattr(checkpoint, "load_pruned"):
        pytest.skip("LLMPruner.checkpoint here predates heterogeneous loading (load_pruned)")
    peft_model = pruned_lora_model(layers=[1])
    with torch.no_grad():
        expected = peft_model(IDS).logits
    folder = save_merged(peft_model, char_tokenizer(), tmp_path / "merged")
    assert_paths_agree(reload_logits(folder), expected)


def test_merge_adapter_command_folds_a_saved_adapter_into_a_pruned_folder(tmp_path):
    model = pruned_model(layers=[0, 1, 2])
    checkpoint.save_pruned(model, char_tokenizer(), tmp_path / "pruned")
    peft_model = pruned_lora_model(model=model)
    with torch.no_grad():
        expected = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    folder = merge_adapter(str(tmp_path / "pruned"), str(tmp_path / "adapter"), str(tmp_path / "out"))
    assert_paths_agree(reload_logits(folder), expected)
    with pytest.raises(FileNotFoundError, match="--adapter .*no adapter_config.json"):
        merge_adapter(str(tmp_path / "pruned"), str(tmp_path), str(tmp_path / "out2"))
