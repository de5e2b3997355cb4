"""The ``residual`` refit target (LLMPruner/sequential.py, compensate.CrossStats.extra): the least squares
fits ``W x~ + e`` (hand-checked against lstsq), equals the ``pruned`` target where no error has
accumulated yet (the first pruned layer), and cancels accumulated error that the kept inputs can express."""
import copy

import pytest
import torch

from conftest import tiny_model
from LLMPruner.compensate import CrossStats, reconstruction_objective, solve_refit
from LLMPruner.prune import prune

EX = torch.randint(0, 64, (32, 32), generator=torch.Generator().manual_seed(3))


def test_extra_target_least_squares_equals_lstsq():
    g = torch.Generator().manual_seed(0)
    xp = torch.randn(200, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    e = torch.randn(200, 3, generator=g, dtype=torch.float64)
    s = CrossStats.empty(6)
    s.add(xp, xp, e)
    kept = torch.tensor([0, 2, 3, 5])
    v = solve_refit(w, s, kept, ridge=0.0)
    want = torch.linalg.lstsq(xp[:, kept], xp @ w.T + e).solution.T
    torch.testing.assert_close(v, want, rtol=1e-8, atol=1e-8)
    # the objective is the squared error minus the V-independent part sum ||y||^2
    y = xp @ w.T + e
    full = float(((y - xp[:, kept] @ v.T) ** 2).sum())
    assert reconstruction_objective(w, v, s, kept) == pytest.approx(full - float((y ** 2).sum()), rel=1e-9)
    # halves merge: extra adds up
    a, b = CrossStats.empty(6), CrossStats.empty(6)
    a.add(xp[:100], xp[:100], e[:100])
    b.add(xp[100:], xp[100:], e[100:])
    torch.testing.assert_close(a.merged(b).extra, s.extra)
    assert CrossStats.empty(6).merged(CrossStats.empty(6)).extra is None


def _prune(target, layers, model):
    m = copy.deepcopy(model)
    prune(m, pruner_type="l2", param_budget=0.3, attention_layers=range(0), mlp_layers=layers,
          compensation="refit", selection="obs", examples=EX, refit_target=target)
    return m


def test_residual_target_equals_pruned_target_in_the_first_pruned_layer():
    base = tiny_model(seed=8)
    a, b = _prune("pruned", range(1, 2), base), _prune("residual", range(1, 2), base)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def _hidden_error(model, dense, ids):
    with torch.no_grad():
        return float(((model.model(ids, use_cache=False).last_hidden_state
                       - dense.model(ids, use_cache=False).last_hidden_state) ** 2).sum())


def test_residual_target_lowers_the_final_hidden_state_error_on_calibration_tokens():
    base = tiny_model(seed=9)
    errors = {t: _hidden_error(_prune(t, range(0, 3), base), base, EX) for t in ("pruned", "residual")}
    assert errors["residual"] < errors["pruned"], errors
