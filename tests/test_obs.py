"""Structured OBS selection (LLMPruner/select/obs.py): hand-checked math, zero-impact units, reconstruction error
against score-based selection with the same refit, the CLI end to end."""
import copy
import json

import pytest
import torch

from cli_helpers import run_cli
from conftest import need_shared, tiny_model
from LLMPruner.discover import discover
from LLMPruner.select.obs import damped_inverse, obs_select, unit_errors
from LLMPruner.prune import prune
from LLMPruner.shrink import count_parameters

G = torch.Generator().manual_seed(0)
X = torch.randn(40, 6, generator=G, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.5, 0.2, 1.0])
W = torch.randn(3, 6, generator=G, dtype=torch.float64)
H = X.T @ X
SINGLE = torch.arange(6)[:, None]


def _refit(w, x, kept):
    """Brute force: least-squares columns for ``kept`` reproducing ``w x`` (lstsq on the tokens)."""
    return torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T


def _residual(w, x, kept):
    return float(((x @ w.T - x[:, kept] @ _refit(w, x, kept).T) ** 2).sum())


def test_single_column_error_and_update_equal_brute_force_least_squares():
    hinv, lam = damped_inverse(H, damp=0.0)
    assert lam == 0.0
    errors = unit_errors(W, hinv, SINGLE, lam)
    for j in range(6):
        kept = [i for i in range(6) if i != j]
        assert errors[j].item() == pytest.approx(_residual(W, X, kept), rel=1e-9)
        assert errors[j].item() == pytest.approx(float(W[:, j].pow(2).sum() / torch.linalg.inv(H)[j, j]), rel=1e-9)
    removed, w_new, err = obs_select(W, H, SINGLE, 3, damp=0.0)
    kept = [i for i in range(6) if i not in removed]
    torch.testing.assert_close(w_new[:, kept], _refit(W, X, kept), rtol=1e-9, atol=1e-9)
    assert torch.all(w_new[:, removed] == 0)
    assert sum(err) == pytest.approx(_residual(W, X, kept), rel=1e-9)  # greedy errors add up to the total
    assert removed[0] == int(torch.argmin(errors))


def test_two_column_units_error_equals_brute_force():
    cols = torch.tensor([[0, 1], [2, 3], [4, 5]])
    hinv, lam = damped_inverse(H, damp=0.0)
    errors = unit_errors(W, hinv, cols, lam)
    for u in range(3):
        kept = [i for i in range(6) if i not in cols[u].tolist()]
        assert errors[u].item() == pytest.approx(_residual(W, X, kept), rel=1e-9)
    removed, w_new, _ = obs_select(W, H, cols, 2, damp=0.0)
    kept = cols[[u for u in range(3) if u not in removed]].reshape(-1).tolist()
    torch.testing.assert_close(w_new[:, kept], _refit(W, X, kept), rtol=1e-9, atol=1e-9)


def test_damped_update_is_the_ridge_refit_and_dead_columns_cost_nothing():
    x = X.clone()
    x[:, 2] = 0.0                            # a never-active input
    w = W.clone()
    w[:, 4] = 0.0                            # a column that is all zero
    h = x.T @ x
    removed, w_new, err = obs_select(w, h, SINGLE, 3, damp=0.05)
    assert sorted(removed[:2]) == [2, 4] and err[0] == pytest.approx(0.0, abs=1e-9)
    assert err[1] == pytest.approx(0.0, abs=1e-9)
    kept = [i for i in range(6) if i not in removed]
    lam = 0.05 * h.diagonal().mean()
    hd = h + lam * torch.eye(6, dtype=torch.float64)
    ridge = w @ hd[:, kept] @ torch.linalg.inv(hd[kept][:, kept])
    torch.testing.assert_close(w_new[:, kept], ridge, rtol=1e-9, atol=1e-9)


EX = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=EX):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_zero_impact_channels_go_first_and_logits_do_not_change():
    model = tiny_model()
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 5] = 0.0     # no effect on the output
        mlp.up_proj.weight[11] = 0.0         # never active: act(gate) * 0
    before = _logits(model)
    # 48 - int(48 * 0.96) = 2 channels of layer 1 (reference rounding)
    result = prune(model, pruner_type="l2", pruning_ratio=0.04, attention_layers=range(0), mlp_layers=range(1, 2),
                   compensation="refit", selection="obs", examples=EX)
    assert result.plans[0].removed_units["mlp@1"] == [5, 11]
    assert model.model.layers[1].mlp.down_proj.in_features == 46
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


def _mlp_inputs(model, layer):
    seen = []
    h = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    _logits(model)
    h.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()


@pytest.mark.parametrize("pruner", ["l2", "taylor"])
def test_obs_never_reconstructs_worse_than_score_selection_with_the_same_refit(pruner):
    model = tiny_model(seed=3)
    fams = [f for f in discover(model).families if f.kind == "mlp" and f.layer == 1]
    from LLMPruner.score.estimate import estimate
    scores = estimate(model, fams, pruner_type=pruner, examples=EX)["mlp@1"]
    x = _mlp_inputs(model, 1)                                          # the first pruned layer: dense inputs
    w = model.model.layers[1].mlp.down_proj.weight.detach().double()
    cols = torch.arange(48)[:, None]
    for n in (4, 12, 24):
        by_score = torch.argsort(scores, stable=True)[:n].tolist()
        removed, _, _ = obs_select(w, x.T @ x, cols, n, damp=1e-8)
        err = {name: _residual(w, x, [i for i in range(48) if i not in r])
               for name, r in (("obs", removed), (pruner, by_score))}
        assert err["obs"] <= err[pruner], (n, err)


def test_obs_needs_the_sequential_refit():
    with pytest.raises(ValueError, match="--compensation refit"):
        prune(tiny_model(), pruner_type="l2", pruning_ratio=0.25, mlp_layers=range(1, 2), selection="obs",
              examples=EX)


def test_cli_obs_run_saves_a_model_that_loads_with_equal_logits(tmp_path):
    stories = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    argv = ["--base_model", str(stories), "--device", "cpu", "--eval_device", "cpu", "--pruner_type", "l2",
            "--param_budget", "0.2", "--skip_attention", "--block_mlp_layer_start", "1", "--block_mlp_layer_end",
            "4", "--compensation", "refit", "--selection", "obs", "--num_examples", "32",
            "--calibration_seq_len", "32", "--calibration_data", str(text), "--save_model",
            "--log_dir", str(tmp_path / "prune_log"), "--save_ckpt_log_name", "obs"]
    status, _, err = run_cli("hf_prune.py", argv)
    assert status == 0, err[-3000:]
    run_dir = tmp_path / "prune_log" / "obs"
    results = json.loads((run_dir / "results.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())[0]["removed_units"]
    from LLMPruner.select.budget import non_embedding_parameters, unit_cost
    from LLMPruner.checkpoint import load_model, load_pruned
    from LLMPruner.data.calibration import calibration_examples
    dense, tok = load_model(str(stories), device="cpu")
    fams = {f.key: f for f in discover(dense).families}
    budget = int(0.2 * non_embedding_parameters(dense))
    removed = sum(len(u) * unit_cost(dense, fams[k]) for k, u in plan.items())
    assert results["params_after"] == count_parameters(dense) - removed
    assert budget - unit_cost(dense, fams["mlp@1"]) < removed <= budget   # the budget, to within one unit
    assert set(plan) == {"mlp@1", "mlp@2", "mlp@3"}
    loaded, _ = load_pruned(run_dir)
    # the same pruning in this process, from the same calibration text and seed
    model = copy.deepcopy(dense)
    ex = calibration_examples(str(text), tok, 32, 32, 42)
    again = prune(model, pruner_type="l2", param_budget=0.2, attention_layers=range(0), mlp_layers=range(1, 4),
                  compensation="refit", selection="obs", examples=ex, seed=42)
    assert again.plans[0].removed_units == plan
    ids = ex[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, dense(ids).logits)


def test_allocation_spends_removals_on_the_smallest_scaled_marginal_errors():
    from LLMPruner.select.allocation import allocate
    curves = {"a": [1.0, 2.0, 10.0], "b": [1.5, 3.0]}
    assert allocate(curves, {"a": 1.0, "b": 1.0}, 3) == {"a": 2, "b": 1}     # 1, 1.5, 2
    assert allocate(curves, {"a": 1.0, "b": 10.0}, 3) == {"a": 1, "b": 2}    # 0.15, 0.3, 1
    with pytest.raises(ValueError, match="only 5 allowed"):
        allocate(curves, {"a": 1.0, "b": 1.0}, 6)


@pytest.mark.parametrize("how", ["residual"])
def test_obs_allocation_keeps_the_budget_and_moves_units_between_layers(how):
    dense = tiny_model(num_hidden_layers=4, seed=5)
    mlp = dense.model.layers[2].mlp
    with torch.no_grad():  # layer 2's MLP channels come in identical pairs: half of them cost ~nothing
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[1::2] = lin.weight[0::2]
        mlp.down_proj.weight[:, 1::2] = mlp.down_proj.weight[:, 0::2]
    runs = {}
    for alloc in ("uniform", how):
        model = copy.deepcopy(dense)
        r = prune(model, pruner_type="l2", param_budget=0.2, attention_layers=range(0), mlp_layers=range(4),
                  compensation="refit", selection="obs", obs_allocation=alloc, examples=EX)
        runs[alloc] = ({k: len(v) for k, v in r.plans[0].removed_units.items()}, count_parameters(model))
    assert runs["uniform"][1] == runs[how][1]                       # same parameter count
    assert sum(runs["uniform"][0].values()) == sum(runs[how][0].values())
    assert runs[how][0]["mlp@2"] > runs["uniform"][0]["mlp@2"]


def test_obs_allocation_refuses_units_of_different_costs():
    with pytest.raises(ValueError, match="--obs_allocation residual"):
        prune(tiny_model(), pruner_type="l2", param_budget=0.2, attention_layers=range(1, 2),
              mlp_layers=range(1, 2), compensation="refit", selection="obs", obs_allocation="residual",
              examples=EX)


@pytest.mark.parametrize("extra,message", [
    (["--selection", "obs"], "--selection obs with --compensation none"),
    (["--obs_allocation", "residual"], "--obs_allocation residual needs --selection obs"),
    (["--obs_allocation", "kl"], "argument --obs_allocation: invalid choice: 'kl'"),  # dropped: docs/tried_and_dropped.md
    (["--selection", "obs", "--compensation", "refit", "--obs_damp", "0"], "--obs_damp 0.0: must be > 0"),
])
def test_cli_refuses_unsupported_obs_combinations(tmp_path, extra, message):
    argv = ["--base_model", str(tmp_path), "--log_dir", str(tmp_path / "log"), *extra]
    status, _, err = run_cli("hf_prune.py", argv)
    assert status != 0 and message in err, err[-2000:]
    assert not (tmp_path / "log").exists()


def test_a_heavily_weighted_prior_decides_and_the_update_stays_the_least_squares_refit():
    prior = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3])
    removed, w_new, _ = obs_select(W, H, SINGLE, 3, damp=0.0, prior=prior, prior_weight=1e6)
    assert removed == [1, 3, 5]
    kept = [0, 2, 4]
    torch.testing.assert_close(w_new[:, kept], _refit(W, X, kept), rtol=1e-9, atol=1e-9)
