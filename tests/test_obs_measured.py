"""Measured allocation (``--obs_allocation kl``, LLMPruner/obs_measured.py): the refit it measures equals
OBS's, the hull is hand-computed, the measured KL is the real KL of the model pruned in that one layer,
and the counts follow the damage (a layer whose MLP barely matters takes the removals)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from LLMPruner.graph import discover
from LLMPruner.obs import obs_select
from LLMPruner.obs_allocation import obs_counts
from LLMPruner.obs_measured import hull_marginals, measured_curves, refit_kept
from LLMPruner.prune import prune
from LLMPruner.shrink import count_parameters
from tolerance import assert_paths_agree

EX = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(2))


def test_refit_kept_is_what_greedy_obs_leaves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)
    for damp in (0.0, 0.01, 0.3):
        removed, w_obs, _ = obs_select(w, x.T @ x, torch.arange(7)[:, None], 4, damp=damp)
        torch.testing.assert_close(refit_kept(w, x.T @ x, torch.tensor(removed), damp), w_obs, rtol=1e-9, atol=1e-9)


def test_hull_marginals_hand_computed():
    # (2, 1.0) lies above the chord from (0, 0) to (4, 1.5): the hull skips it
    assert hull_marginals([(0, 0.0), (2, 1.0), (4, 1.5), (6, 4.0)], 6) == [0.375] * 4 + [1.25] * 2
    # already convex: the slopes themselves
    assert hull_marginals([(0, 0.0), (1, 0.5), (3, 2.5)], 3) == [0.5, 1.0, 1.0]
    # a noisy dip (cost falls) is flattened, never a falling marginal
    m = hull_marginals([(0, 0.0), (2, 2.0), (4, 1.0), (5, 3.0)], 5)
    assert m == sorted(m) and sum(m) == pytest.approx(3.0)


def _kl(dense_logits, logits):
    p = F.log_softmax(dense_logits.double(), -1)
    q = F.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_measured_kl_is_the_kl_of_the_model_pruned_in_that_layer_alone():
    model = tiny_model(seed=4).eval()
    fams = [f for f in discover(model).families if f.kind == "mlp"]
    curves = measured_curves(model, fams, EX, damp=0.01, batch_size=8, max_fraction=0.5, levels=(0.5,))
    with torch.no_grad():
        dense = model(EX, use_cache=False).logits
    for fam in fams:
        assert len(curves[fam.key]) == 24                          # int(0.5 * 48): one marginal per unit
        down = model.model.layers[fam.layer].mlp.down_proj
        x = []
        h = down.register_forward_pre_hook(lambda m, a: x.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(EX, use_cache=False)
        h.remove()
        x = torch.cat(x).double()
        removed, w_new, _ = obs_select(down.weight.detach(), x.T @ x, torch.arange(48)[:, None], 24, damp=0.01)
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            pruned.model.layers[fam.layer].mlp.down_proj.weight.copy_(w_new.float())
            kl = _kl(dense, pruned(EX, use_cache=False).logits)
        assert sum(curves[fam.key]) == pytest.approx(kl, rel=1e-2)   # one level: a straight line (fp32 log-probs)
        assert kl > 0


def test_kl_allocation_sends_the_removals_to_the_layer_that_matters_least():
    model = tiny_model(seed=5)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)    # layer 1's MLP barely changes the output
    before = copy.deepcopy(model)
    fams = [f for f in discover(model).families if f.kind == "mlp"]
    uniform = {f.key: list(range(8)) for f in fams}              # 24 removals in all
    counts = {k: len(v) for k, v in obs_counts(model, fams, uniform, EX, "kl", max_fraction=0.5).items()}
    assert sum(counts.values()) == 24
    assert counts["mlp@1"] == 24, counts                         # the cap, int(0.5 * 48)
    for a, b in zip(model.parameters(), before.parameters()):     # measuring leaves the model as it was
        assert torch.equal(a, b)


def test_kl_and_normalized_allocations_prune_to_the_exact_budget_and_reload(tmp_path):
    from LLMPruner.checkpoint import load_pruned, save_pruned
    base = tiny_model(seed=6)
    ids = torch.randint(0, 64, (32, 32), generator=torch.Generator().manual_seed(4))
    got = {}
    for how in ("uniform", "kl", "normalized"):
        model = copy.deepcopy(base)
        prune(model, pruner_type="l2", param_budget=0.2, attention_layers=range(0), mlp_layers=range(0, 3),
              compensation="refit", selection="obs", obs_allocation=how, examples=ids)
        got[how] = count_parameters(model)
        save_pruned(model, None, tmp_path / how)
        again, _ = load_pruned(tmp_path / how)
        with torch.no_grad():
            assert_paths_agree(again.eval()(EX).logits, model.eval()(EX).logits)
    assert got["kl"] == got["normalized"] == got["uniform"] < count_parameters(base)


def test_normalized_grams_weigh_each_token_by_its_layer_output_rms():
    from LLMPruner.activations import consumers
    from LLMPruner.obs_allocation import normalized_grams
    model = tiny_model(seed=7)
    fams = [f for f in discover(model).families if f.kind == "mlp"]
    cons = consumers(model, fams)
    grams = normalized_grams(model, cons, EX, batch_size=8)
    layer = model.model.layers[1]
    seen = {}
    h1 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    h2 = layer.register_forward_hook(lambda m, a, y: seen.__setitem__("h", y[0] if isinstance(y, tuple) else y))
    with torch.no_grad():
        model(EX, use_cache=False)
    h1.remove()
    h2.remove()
    x, h = seen["x"].double().reshape(-1, 48), seen["h"].double().reshape(-1, 32)
    w = 1.0 / h.pow(2).mean(-1)                                   # 1 / ms(h_t)
    want = (x * w[:, None]).T @ x
    torch.testing.assert_close(grams["model.layers.1.mlp.down_proj.weight"], want, rtol=1e-6, atol=1e-9)
