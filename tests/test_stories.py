"""Every pruner type x mode on the real pretrained GQA model stories260K; generate() works afterwards."""
import pytest
import torch

from conftest import need_shared
from LLMPruner.data.calibration import calibration_examples
from LLMPruner.prune import prune

PRUNERS = [("random", None), ("l1", None), ("l2", None), ("taylor", "vectorize"), ("taylor", "param_first"),
           ("taylor", "param_second"), ("taylor", "param_mix")]


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    tok = AutoTokenizer.from_pretrained(path)
    examples = calibration_examples(str(text), tok, num_examples=4, seq_len=64, seed=0)
    return lambda: AutoModelForCausalLM.from_pretrained(path).eval(), examples


CASES = [(p, t, m) for m in ("block_wise", "channel_wise") for p, t in PRUNERS] + [("l2", None, "layer_wise")]


@pytest.mark.parametrize("pruner, taylor, mode", CASES)  # layer_wise keeps the first layers: no estimator
def test_every_pruner_and_mode(stories, pruner, taylor, mode):
    load, examples = stories
    model = load()
    result = prune(model, mode=mode, pruning_ratio=0.25, pruner_type=pruner, taylor=taylor or "param_first",
                   attention_layers=range(1, 4), mlp_layers=range(1, 4), layer=3, examples=examples)
    s = result.structure
    if mode == "block_wise":
        assert [l.num_key_value_heads for l in s.layers] == [4, 3, 3, 3, 4]
        assert [l.intermediate_size for l in s.layers] == [172, 129, 129, 129, 172]
    elif mode == "channel_wise":
        assert s.hidden_size == 48
    else:
        assert s.num_hidden_layers == 3
    out = model.generate(torch.tensor([[1]]), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 9)


def test_taylor_keeps_the_model_better_than_random(stories):
    load, examples = stories
    ids = examples.clone()
    losses = {}
    for pruner in ("random", "taylor"):
        model = load()
        prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type=pruner, attention_layers=range(1, 4),
              mlp_layers=range(1, 4), examples=examples)
        with torch.no_grad():
            losses[pruner] = model(ids, labels=ids).loss.item()
    assert losses["taylor"] < losses["random"]
