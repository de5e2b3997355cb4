"""Image-text checkpoints (Gemma-3 4B+, Mistral Small 3.x): ``--text_only`` prunes the language model alone.

Tiny image-text models built in code and saved as transformers writes them: loading refuses them without
the flag (naming it), gives the language model with the same logits on text with it, prunes and saves a
text-only checkpoint that reloads, streams under ``--offload`` from either tensor naming, and runs through
the real CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText

from cli_helpers import run_cli
from conftest import need_shared
from LLMPruner import load_pruned, prune, save_pruned
from LLMPruner.checkpoint import CheckpointError, load_model
from LLMPruner.stream.pipeline import open_source, prune_offloaded
from tolerance import assert_paths_agree

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41]])
TEXT = dict(vocab_size=600, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def image_text_config(kind: str):
    if kind == "gemma3":
        return AutoConfig.for_model(
            "gemma3", text_config=dict(model_type="gemma3_text", sliding_window=4, **TEXT),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=590, boi_token_index=591, eoi_token_index=592)
    if kind == "llava":
        return AutoConfig.for_model(
            "llava", text_config=dict(model_type="llama", **TEXT), image_token_index=590,
            vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                               projection_dim=16))
    return AutoConfig.for_model(
        "mistral3", text_config=dict(model_type="mistral", **TEXT),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, head_dim=8),
        image_token_index=590)


def image_text_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(image_text_config(kind)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(params=["gemma3", "mistral3", "llava"])
def saved(request, tmp_path):
    model = image_text_model(request.param)
    model.save_pretrained(tmp_path / "dense")
    return request.param, model, tmp_path / "dense"


def test_refused_without_the_flag_then_the_language_model_with_the_same_logits(saved):
    kind, dense, folder = saved
    with pytest.raises(CheckpointError, match=f"model_type '{kind}' is an image-text model.*--text_only"):
        load_model(folder)
    model, _ = load_model(folder, text_only=True)
    assert model.config.model_type == {"gemma3": "gemma3_text", "mistral3": "mistral", "llava": "llama"}[kind]
    assert not any("vision" in n or "projector" in n for n, _ in model.named_parameters())
    kept = {id(p): p for p in [*dense.model.language_model.parameters(), *dense.get_output_embeddings().parameters()]}
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in kept.values())
    assert_paths_agree(logits(model), logits(dense))
    # a text model is unchanged by the flag
    again, _ = load_model(folder, text_only=True)
    assert type(again) is type(model)


def test_pruned_language_model_saves_and_reloads_as_a_text_checkpoint(saved, tmp_path):
    kind, dense, folder = saved
    model, _ = load_model(folder, text_only=True)
    prune(model, pruning_ratio=0.5, pruner_type="l2", attention_layers=range(1, 3), mlp_layers=range(0, 2))
    save_pruned(model, None, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == model.config.model_type and "vision_config" not in config
    again, _ = load_pruned(tmp_path / "pruned")
    assert_paths_agree(logits(again), logits(model))


@pytest.mark.parametrize("naming", ["as saved", "in-memory names"])
def test_offload_streams_the_language_model_like_the_in_memory_run(saved, tmp_path, naming):
    kind, _, folder = saved
    if naming == "in-memory names":  # model.language_model.* / lm_head.*: the other layout checkpoints use
        file = folder / "model.safetensors"
        tensors = load_file(file)
        renamed = {k.replace("language_model.model.", "model.language_model.", 1)
                   .replace("language_model.lm_head.", "lm_head.", 1): v for k, v in tensors.items()}
        assert renamed.keys() != tensors.keys()
        save_file(renamed, file, metadata={"format": "pt"})
    examples = torch.randint(0, 500, (8, 16), generator=torch.Generator().manual_seed(0))
    common = dict(pruning_ratio=0.5, pruner_type="l2", attention_layers=range(1, 3), mlp_layers=range(0, 2),
                  examples=examples, calibration_batch_size=4)
    with pytest.raises(CheckpointError, match="--text_only"):
        open_source(folder)
    source, _, config = open_source(folder, text_only=True)
    assert config.model_type != kind
    streamed = prune_offloaded(source, save_to=tmp_path / "off", **common)
    model, _ = load_model(tmp_path / "dense" if naming == "as saved" else folder, text_only=True)
    in_memory = prune(model, **common)
    assert streamed.plan.to_dict() == in_memory.plans[-1].to_dict()
    again, _ = load_pruned(tmp_path / "off")
    assert_paths_agree(logits(again), logits(model))


def test_cli_prunes_an_image_text_folder_only_with_the_flag(tmp_path):
    stories = need_shared("models", "stories260K")
    data = need_shared("data")
    from transformers import AutoTokenizer
    model = image_text_model("gemma3")
    model.save_pretrained(tmp_path / "gemma3")
    AutoTokenizer.from_pretrained(stories).save_pretrained(tmp_path / "gemma3")  # 512 ids < 600
    common = ["--base_model", str(tmp_path / "gemma3"), "--device", "cpu", "--eval_device", "cpu",
              "--pruning_ratio", "0.5", "--pruner_type", "l2", "--block_attention_layer_start", "1",
              "--block_attention_layer_end", "3", "--block_mlp_layer_start", "0", "--block_mlp_layer_end", "2",
              "--save_model", "--log_dir", str(tmp_path / "log")]
    status, _, err = run_cli("hf_prune.py", common + ["--save_ckpt_log_name", "refused"])
    assert status == 2 and "--text_only" in err and "Traceback" not in err
    assert not (tmp_path / "log" / "refused").exists()
    status, _, err = run_cli("hf_prune.py", common + ["--text_only", "--save_ckpt_log_name", "text"])
    assert status == 0, err[-3000:]
    pruned, _ = load_pruned(tmp_path / "log" / "text")
    assert pruned.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert data.exists()


def test_evaluation_and_the_distillation_teacher_read_the_language_model(saved, monkeypatch):
    """Text evaluation and a KD teacher need no flag: on text the language model's logits are the model's."""
    import argparse

    from LLMPruner.evaluate.models import CheckpointSpec, load_for_eval
    from LLMPruner.recover import run as post  # post_training.py's run
    kind, dense, folder = saved
    model, _ = load_for_eval(CheckpointSpec(name="dense", model=str(folder), lora=None))
    assert_paths_agree(logits(model), logits(dense))
    seen = {}
    monkeypatch.setattr(post, "distill_trainer_class", lambda teacher, config: seen.setdefault("teacher", teacher))
    args = argparse.Namespace(distill_loss="kl", teacher=str(folder), kd_alpha=0.5, kd_temperature=1.0,
                                   kd_chunk_tokens=1024, teacher_device=None)
    post.distill_trainer(args, torch.float32)
    assert_paths_agree(logits(seen["teacher"]), logits(dense))


def test_an_unsupported_language_model_fails_before_loading(tmp_path, monkeypatch):
    """With --text_only, the language model's type is checked from the config alone (the list of supported
    types in the message), before the image-text weights are read."""
    from LLMPruner.adapters import UnsupportedArchitectureError
    from LLMPruner.checkpoint import load as load_module
    image_text_model("mistral3").save_pretrained(tmp_path / "m")
    monkeypatch.setattr(load_module, "get_adapter", lambda config: (_ for _ in ()).throw(
        UnsupportedArchitectureError(f"architecture model_type={config.model_type!r} has no LLMPruner adapter")))
    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained",
                        lambda *a, **k: pytest.fail("loaded the weights before checking the language model"))
    with pytest.raises(UnsupportedArchitectureError, match="model_type='mistral' has no LLMPruner adapter"):
        load_model(tmp_path / "m", text_only=True)
