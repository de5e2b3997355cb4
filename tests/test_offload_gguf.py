"""``--offload`` from a GGUF file: the tensors are read and dequantised one at a time (``GGUFSource``) instead
of the whole model being dequantised onto the CPU first; the values and the pruned model are the same."""
import pytest
import torch
from conftest import need_shared
from LLMPruner import prune
from LLMPruner.checkpoint import load_model
from LLMPruner.export import export_gguf
from LLMPruner.stream.gguf_source import GGUFSource
from LLMPruner.stream.pipeline import open_source, prune_offloaded
from test_offload_obs import _same_model
from tolerance import assert_paths_agree

EXAMPLES = torch.randint(3, 500, (16, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory):
    """stories260K (5 uniform layers, GQA, tied embeddings) as a Q8_0 GGUF: quantised matrices, f32 norms."""
    model, tok = load_model(need_shared("models", "stories260K"))
    return export_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "stories.gguf", outtype="q8_0", pad_to=1)


def test_gguf_source_gives_the_tensors_transformers_dequantises(stories_gguf):
    source, tokenizer, config = open_source(stories_gguf)
    assert isinstance(source, GGUFSource) and tokenizer is not None
    loaded, _ = load_model(stories_gguf)  # transformers' own GGUF loader, the whole model at once
    params = dict(loaded.named_parameters())
    assert source.keys() == set(params)  # tied: the head is the embedding, one tensor
    for name, p in params.items():
        got = source.get(name)
        assert got.dtype == torch.float32 and got.shape == p.shape, name
        assert_paths_agree(got, p.detach(), msg=name)  # q/k rows turned back too
    assert not hasattr(config, "quantization_config")


def test_offload_from_gguf_equals_the_in_memory_run(stories_gguf, tmp_path):
    common = dict(pruner_type="l2", param_budget=0.2, compensation="refit", selection="obs",
                  obs_allocation="residual", examples=EXAMPLES, calibration_batch_size=4, attention_layers=range(0),
                  mlp_layers=range(0, 5))
    model, _ = load_model(stories_gguf)
    in_memory = prune(model, **common)
    source, tokenizer, _ = open_source(stories_gguf)
    streamed = prune_offloaded(source, save_to=tmp_path / "off", tokenizer=tokenizer, **common)
    _same_model(tmp_path, model, streamed, in_memory)
    assert any(streamed.plan.removed_units.values())
    back, _ = load_model(tmp_path / "off")
    assert back.config.layer_shapes and back.config.layer_shapes == model.config.layer_shapes  # non-uniform


def test_a_gguf_with_per_layer_shapes_takes_the_whole_model_path(tmp_path):
    """A pruned (heterogeneous) GGUF cannot be streamed into the uniform skeleton: loaded on the CPU instead."""
    model, tok = load_model(need_shared("models", "stories260K"))
    prune(model, pruning_ratio=0.25, pruner_type="l2", mlp_layers=range(1, 4))
    out = export_gguf(model, tok, tmp_path / "pruned.gguf", outtype="f32", pad_to=1)
    source, _, config = open_source(out)
    assert isinstance(source, torch.nn.Module) and config.layer_shapes


def test_cli_offload_from_a_gguf_streams_it_and_saves_a_model_that_loads(stories_gguf, tmp_path):
    from test_cli_prune import run
    data = need_shared("data")
    proc = run(["--base_model", str(stories_gguf), "--offload", "--device", "cpu", "--pruner_type", "wanda",
                "--pruning_ratio", "0.25", "--block_mlp_layer_start", "0", "--block_mlp_layer_end", "5",
                "--compensation", "refit", "--num_examples", "24", "--calibration_seq_len", "64",
                "--calibration_data", str(data / "tinystories" / "tinystories_val.txt"),
                "--save_ckpt_log_name", "g"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "prune_log" / "g"
    assert "(GGUF) one tensor at a time" in proc.stderr and "loading it once on the CPU" not in proc.stderr
    model, _ = load_model(folder)
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == [129] * 5  # the reference's rounding


@pytest.mark.slow
def test_smollm2_q4_1_gguf_streams_the_tensors_transformers_dequantises():
    """The real file: Q8_0 embedding, Q4_1 matrices, f32 norms, 9 query heads in 3 KV groups (q/k rotary rows)."""
    folder = need_shared("models", "SmolLM2-135M-Instruct-Q4_1")
    source, _, config = open_source(folder)
    assert isinstance(source, GGUFSource) and config.num_key_value_heads == 3
    loaded, _ = load_model(folder, dtype=torch.float32)
    params = dict(loaded.named_parameters())
    assert source.keys() == set(params)
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.7.mlp.down_proj.weight",
                 "model.layers.29.post_attention_layernorm.weight", "model.norm.weight"):
        assert_paths_agree(source.get(name), params[name].detach(), msg=name)
