"""Compensation, activation-aware scores, parameter budgets and depth pruning."""
import pytest
import torch

from conftest import tiny_model
from LLMPruner.score.activations import collect_input_stats, consumers
from LLMPruner.select.budget import choose_by_budget, non_embedding_parameters, unit_cost
from LLMPruner.compensate.refit import compensate, refit_weight
from LLMPruner.score.depth import choose_layers
from LLMPruner.score.estimate import unit_scores
from LLMPruner.discover import discover
from LLMPruner.prune import prune
from LLMPruner.select.units import make_plan
from LLMPruner.shrink import apply_plan
from tolerance import assert_paths_agree

EX = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=EX):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _constant_mlp_channel(model, layer, j):
    """Make MLP channel j of ``layer`` output a constant: zero weight rows, non-zero biases."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[j] = 0
        mlp.up_proj.weight[j] = 0
        mlp.gate_proj.bias[j] = 1.5
        mlp.up_proj.bias[j] = -0.7
        mlp.down_proj.weight[:, j] *= 50  # a large contribution: removing it uncompensated hurts


def test_bias_compensation_is_exact_for_a_constant_input():
    model = tiny_model(mlp_bias=True)
    _constant_mlp_channel(model, 1, 5)
    before = _logits(model)
    # fluctuation scores a constant channel 0, so it is the one removed
    prune(model, pruner_type="fluctuation", pruning_ratio=1 / 48, attention_layers=range(0),
          mlp_layers=range(1, 2), examples=EX, compensation="bias")
    assert model.model.layers[1].mlp.down_proj.in_features == 47
    torch.testing.assert_close(_logits(model), before, atol=2e-5, rtol=0)  # PATHS x 2: the folded bias adds a 48-term sum


def test_without_compensation_the_same_removal_changes_outputs():
    model = tiny_model(mlp_bias=True)
    _constant_mlp_channel(model, 1, 5)
    before = _logits(model)
    prune(model, pruner_type="fluctuation", pruning_ratio=1 / 48, attention_layers=range(0),
          mlp_layers=range(1, 2), examples=EX)
    assert (_logits(model) - before).abs().max() > 1e-2


def test_bias_compensation_adds_loadable_biases_to_a_bias_free_llama():
    model = tiny_model()
    prune(model, pruner_type="fluctuation", pruning_ratio=0.5, attention_layers=range(1, 2),
          mlp_layers=range(1, 2), examples=EX, compensation="bias")  # 1 of 2 KV groups, 24 of 48 channels
    assert model.config.mlp_bias and model.config.attention_bias
    assert model.model.layers[1].mlp.down_proj.bias.abs().sum() > 0
    assert model.model.layers[0].mlp.gate_proj.bias.abs().sum() == 0  # zero elsewhere


def test_refit_is_exact_when_removed_input_is_a_combination_of_kept_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    x[:, 4] = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 3]
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 1, 2, 3])
    v = refit_weight(w, x.T @ x, kept, ridge=0.0)
    torch.testing.assert_close(x[:, kept] @ v.T, x @ w.T, atol=1e-9, rtol=0)


def test_refit_reduces_calibration_reconstruction_error():
    errors = {}
    for method in ("none", "refit_oneshot"):
        model = tiny_model()
        fams = [f for f in discover(model).families if f.key == "mlp@1"]
        down = model.model.layers[1].mlp.down_proj
        stats = collect_input_stats(model, consumers(model, fams), EX, gram=True)
        xs = []
        h = down.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, 48)))
        _logits(model)
        h.remove()
        x = torch.cat(xs)
        target = x @ down.weight.detach().T
        plan = make_plan(model, fams, {"mlp@1": list(range(0, 48, 2))})
        compensate(model, plan, stats, method, ridge=1e-6)
        kept = plan.keep["model.layers.1.mlp.down_proj.weight"][1]
        apply_plan(model, plan)
        errors[method] = ((x[:, kept] @ model.model.layers[1].mlp.down_proj.weight.detach().T - target) ** 2).sum()
    assert errors["refit_oneshot"] < 0.8 * errors["none"]  # measured: 0.0041 vs 0.0074


def test_fluctuation_and_wanda_scores_by_hand():
    model = tiny_model()
    fam = discover(model).find("mlp", 0)[0]
    stats = collect_input_stats(model, consumers(model, [fam]), EX)
    xs = []
    down = model.model.layers[0].mlp.down_proj
    h = down.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, 48)))
    _logits(model)
    h.remove()
    x = torch.cat(xs).double()
    w = down.weight.detach().double()
    s = stats["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(s.var, x.var(0, unbiased=False))
    from LLMPruner.score.activations import activation_channel_scores
    fl = activation_channel_scores(model, [fam], stats, "fluctuation")[("model.layers.0.mlp.down_proj.weight", 1)]
    torch.testing.assert_close(fl.double(), x.var(0, unbiased=False) * (w ** 2).sum(0), rtol=1e-5, atol=1e-12)
    wa = activation_channel_scores(model, [fam], stats, "wanda")[("model.layers.0.mlp.down_proj.weight", 1)]
    torch.testing.assert_close(wa.double(), w.abs().sum(0) * x.norm(dim=0), rtol=1e-5, atol=1e-12)
    per_unit = unit_scores([fam], {("model.layers.0.mlp.down_proj.weight", 1): fl})[fam.key]
    assert torch.equal(per_unit, fl)  # an MLP unit is one channel


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5])
def test_parameter_budget_is_met_within_one_unit(budget):
    model = tiny_model(num_hidden_layers=4)
    fams = [f for f in discover(model).families if f.kind in ("attention", "mlp")]
    biggest = max(unit_cost(model, f) for f in fams)
    start = non_embedding_parameters(model)
    prune(model, pruner_type="l2", param_budget=budget, budget_criterion="zscore")
    removed = start - non_embedding_parameters(model)
    assert abs(removed - budget * start) <= biggest
    shapes = [(l.self_attn.q_proj.out_features, l.mlp.gate_proj.out_features) for l in model.model.layers]
    assert len(set(shapes)) > 1 or budget == 0.1  # adaptive: layers end up with different shapes
    assert model.generate(EX[:1], max_new_tokens=3, do_sample=False).shape[1] == EX.shape[1] + 3


def test_budget_unit_costs_by_hand():
    model = tiny_model()  # hidden 32, head_dim 8, 2 query heads per KV head, mlp 48
    att, mlp = discover(model).find("attention", 0)[0], discover(model).find("mlp", 0)[0]
    assert unit_cost(model, att) == 16 * 32 + 8 * 32 + 8 * 32 + 32 * 16  # q rows, k rows, v rows, o columns
    assert unit_cost(model, mlp) == 3 * 32


def test_round_to_gives_multiples():
    model = tiny_model()
    prune(model, pruner_type="l2", param_budget=0.3, round_to=8)
    assert all(l.mlp.gate_proj.out_features % 8 == 0 for l in model.model.layers)


def _identity_layer(model, i):
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("importance", ["block_influence", "ppl", "taylor"])
def test_depth_pruning_removes_the_layer_that_does_nothing(importance, stories_path):
    # a real model: removing any of its trained layers raises the loss, removing a no-op layer does not
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from conftest import need_shared
    from LLMPruner.data.calibration import calibration_examples
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    ex = calibration_examples(str(text), AutoTokenizer.from_pretrained(stories_path), 8, 64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    while len(model.model.layers) > 4:
        del model.model.layers[-1]
    model.config.num_hidden_layers = 4
    _identity_layer(model, 2)
    before = _logits(model, ex)
    plan = choose_layers(model, 1, ex, importance)
    assert plan.keep_layers == [0, 1, 3]
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == 3
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]
    assert_paths_agree(_logits(model, ex), before)
    assert model.generate(ex[:1], max_new_tokens=3, do_sample=False).shape[1] == ex.shape[1] + 3


def test_depth_and_width_combined_meet_the_budget():
    model = tiny_model(num_hidden_layers=4)
    start = non_embedding_parameters(model)
    prune(model, pruner_type="fluctuation", param_budget=0.4, prune_layers=1, examples=EX, compensation="refit")
    assert len(model.model.layers) == 3
    assert abs((start - non_embedding_parameters(model)) / start - 0.4) < 0.05


def test_bad_depth_arguments():
    with pytest.raises(ValueError, match="--prune_layers 3: must be between 0 and 2"):
        choose_layers(tiny_model(), 3, EX)
    with pytest.raises(ValueError, match="--layer_importance 'x'"):
        choose_layers(tiny_model(), 1, EX, "x")
    with pytest.raises(ValueError, match="--param_budget 1.5"):
        prune(tiny_model(), param_budget=1.5)


@pytest.mark.parametrize("kwargs", [
    dict(pruner_type="fluctuation", param_budget=0.3, compensation="refit", prune_layers=1),
    dict(pruner_type="wanda", pruning_ratio=0.25, attention_layers=range(1, 2), mlp_layers=range(1, 3),
         compensation="bias"),
])
def test_everything_saves_and_reloads(tmp_path, kwargs):
    from LLMPruner.checkpoint import load_pruned, save_pruned
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    model = tiny_model(num_hidden_layers=4)
    prune(model, examples=EX, **kwargs)
    save_pruned(model, tok, tmp_path / "ckpt")
    loaded, _ = load_pruned(tmp_path / "ckpt")
    assert_paths_agree(_logits(loaded), _logits(model))  # loaded with its default attention kernel
