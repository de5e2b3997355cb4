"""Discovery finds the right coupled groups by tracing, for several LLaMA-family architectures."""
import pytest
import torch

from conftest import tiny_model
from LLMPruner.adapters import UnsupportedArchitectureError, get_adapter
from LLMPruner.discover import discover


def _shape(fam):
    return {(m.param.split(".")[-2], m.param.split(".")[-1], m.dim): m.indices.shape[1] for m in fam.members}


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_family_groups(model_type, attn):
    model = tiny_model(model_type)  # 4 query heads, 2 KV heads, head_dim 8, hidden 32, mlp 48, 3 layers
    model.config._attn_implementation = attn
    found = discover(model)
    kinds = sorted(f.key for f in found.families)
    assert kinds == sorted(["hidden"] + [f"{k}@{i}" for k in ("attention", "mlp") for i in range(3)])
    attn0 = found.find("attention", 0)[0]
    assert attn0.n_units == 2  # one unit per KV head, carrying the query heads that share it
    expected = {("q_proj", "weight", 0): 16, ("k_proj", "weight", 0): 8, ("v_proj", "weight", 0): 8,
                ("o_proj", "weight", 1): 16}
    if model_type == "qwen2":  # q/k/v biases travel with their rows
        expected.update({("q_proj", "bias", 0): 16, ("k_proj", "bias", 0): 8, ("v_proj", "bias", 0): 8})
    assert _shape(attn0) == expected
    q, k, o = (next(m for m in attn0.members if m.param.endswith(n)) for n in
               ("q_proj.weight", "k_proj.weight", "o_proj.weight"))
    # KV group 1 = k rows 8..15, query heads 2 and 3 = q rows 16..31, o columns 16..31
    assert k.indices[1].tolist() == list(range(8, 16))
    assert q.indices[1].tolist() == list(range(16, 32)) == o.indices[1].tolist()
    mlp = found.find("mlp", 2)[0]
    assert mlp.n_units == 48
    assert _shape(mlp) == {("gate_proj", "weight", 0): 1, ("up_proj", "weight", 0): 1, ("down_proj", "weight", 1): 1}
    assert all(m.indices[5].tolist() == [5] for m in mlp.members)


@pytest.mark.parametrize("tied", [False, True])
def test_hidden_group_spans_the_residual_stream(tied):
    model = tiny_model(tie_word_embeddings=tied)
    hidden = discover(model).find("hidden")[0]
    assert hidden.n_units == 32
    dims = {(m.param, m.dim) for m in hidden.members}
    assert ("model.embed_tokens.weight", 1) in dims and ("model.norm.weight", 0) in dims
    assert (("lm_head.weight", 1) in dims) == (not tied)  # tied: the same tensor as the embedding
    for i in range(3):
        p = f"model.layers.{i}."
        assert {(p + "self_attn.q_proj.weight", 1), (p + "self_attn.o_proj.weight", 0),
                (p + "mlp.down_proj.weight", 0), (p + "mlp.up_proj.weight", 1),
                (p + "input_layernorm.weight", 0), (p + "post_attention_layernorm.weight", 0)} <= dims
    # unit c is hidden channel c in every member
    assert all(m.indices[:, 0].tolist() == list(range(32)) for m in hidden.members)


def test_vocabulary_and_logits_are_never_prunable():
    found = discover(tiny_model())
    for fam in found.families:
        for m in fam.members:
            assert not (m.param == "model.embed_tokens.weight" and m.dim == 0)
            assert not (m.param == "lm_head.weight" and m.dim == 0)


def test_whole_layer_groups():
    found = discover(tiny_model())
    assert len(found.layers) == 3
    assert all(name.startswith(f"model.layers.{i}.") for i, names in enumerate(found.layers) for name in names)


def test_mha_has_one_unit_per_head():
    found = discover(tiny_model(num_key_value_heads=4))
    assert found.find("attention", 1)[0].n_units == 4


def test_real_gqa_model(stories_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(stories_path)
    found = discover(model)
    att = found.find("attention", 3)[0]
    assert att.n_units == 4 and _shape(att)[("q_proj", "weight", 0)] == 16  # 8 heads share 4 KV heads
    assert found.find("mlp", 0)[0].n_units == 172
    assert found.find("hidden")[0].n_units == 64


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    from LLMPruner.adapters import supported_model_types
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported: " + ", ".join(supported_model_types())):
        get_adapter(model)


def _families(model):
    return [(f.key, [(m.param, m.dim, m.indices.tolist()) for m in f.members]) for f in discover(model).families]


def test_comparisons_and_min_max_flow_like_their_named_equivalents():
    """xIELU-style activations use ``x > 0`` and ``torch.min(x, eps)`` (elementwise against a tensor);
    ``x.max(dim=..)`` is a reduction returning (values, indices). Each gives the groups of the op it means."""
    class Act(torch.nn.Module):
        def __init__(self, variant):
            super().__init__()
            self.variant, self.eps = variant, torch.tensor(-1e-6)

        def forward(self, x):
            if self.variant == "named":
                y = torch.where(x.gt(0), x * x, torch.expm1(torch.minimum(x, self.eps)) - x)
                return y - y.amax(dim=-1, keepdim=True) * 0.0
            y = torch.where(x > 0, x * x, torch.expm1(torch.min(x, self.eps)) - x)
            return y - y.max(dim=-1, keepdim=True).values * 0.0
    found = {}
    for variant in ("named", "min_max"):
        model = tiny_model()
        for layer in model.model.layers:
            layer.mlp.act_fn = Act(variant)
        found[variant] = _families(model)
    assert found["min_max"] == found["named"]
    mlp = [members for key, members in found["named"] if key == "mlp@1"][0]
    assert all(len(idx) == 48 for _, _, idx in mlp)  # one unit per channel, as with silu
