"""The sequential refit's ridge pulls the kept columns toward their dense values (compensate.solve_refit):
hand-checked against an augmented least squares, equal to the damped OBS update, and still compensating
a layer whose Gram one massive channel dominates (SmolLM2's attention-sink layer), where a ridge toward
zero lost to plain slicing."""
import torch

from LLMPruner.compensate.refit import CrossStats, reconstruction_objective, refit_layer, solve_refit
from LLMPruner.select.obs import obs_select


def _stats(x: torch.Tensor) -> CrossStats:
    s = CrossStats.empty(x.shape[1])
    s.add(x.double(), x.double())
    return s


def _data(seed: int = 0, n: int = 300, d: int = 8, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)   # correlated inputs
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x, w


def test_refit_is_the_ridge_least_squares_toward_the_kept_columns():
    x, w = _data()
    s = _stats(x)
    kept = torch.tensor([0, 2, 3, 5, 6])
    xd = x.double()
    for ridge in (0.0, 1e-2, 1.0):
        lam = ridge * float(s.gram[kept][:, kept].diagonal().mean())
        # min ||X W^T - X_K V^T||^2 + lam ||V - W_K||^2  ==  lstsq of [X_K; sqrt(lam) I] V^T = [X W^T; sqrt(lam) W_K^T]
        a = torch.cat([xd[:, kept], lam ** 0.5 * torch.eye(len(kept), dtype=torch.float64)])
        b = torch.cat([xd @ w.T, lam ** 0.5 * w[:, kept].T])
        want = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(solve_refit(w, s, kept, ridge), want, rtol=1e-6, atol=1e-6)
    # a huge ridge leaves the kept columns as they are (plain slicing)
    torch.testing.assert_close(solve_refit(w, s, kept, 1e9), w[:, kept], rtol=0, atol=1e-6)


def test_refit_equals_the_damped_obs_update_for_the_same_damping():
    x, w = _data(seed=1)
    s = _stats(x)
    damp = 0.05
    removed, w_obs, _ = obs_select(w, s.gram, torch.arange(8)[:, None], 3, damp=damp)
    kept = torch.tensor(sorted(set(range(8)) - set(removed)))
    # OBS damps with lam = damp * mean diag(G); the refit's ridge is relative to mean diag(G_KK)
    ridge = damp * float(s.gram.diagonal().mean()) / float(s.gram[kept][:, kept].diagonal().mean())
    torch.testing.assert_close(solve_refit(w, s, kept, ridge), w_obs[:, kept], rtol=1e-8, atol=1e-8)


def test_a_layer_with_one_massive_channel_is_still_refitted():
    """As SmolLM2's layer 11 (the MLP that writes the attention sink): channel 0 is huge on one token of
    every 64, all of them in the fit half (position 0 is even); the held-out half has no such token."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 8, generator=g) @ torch.randn(8, 8, generator=g)
    x_fit, x_chk = x[0::2].clone(), x[1::2].clone()
    x_fit[::32] = 0.0
    x_fit[::32, 0] = 3e4                                        # the sink token: one massive channel
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 1, 2, 4, 6])
    fit, check = _stats(x_fit), _stats(x_chk)
    sliced = reconstruction_objective(w, w[:, kept], check, kept)
    v, report = refit_layer(w, fit, kept, check=check)
    assert "lowers" in report, report
    assert reconstruction_objective(w, v, check, kept) < sliced
    # the same least squares shrunk toward zero, at the smallest ridge of the grid, loses to slicing there
    g_kk = fit.gram[kept][:, kept]
    lam = 1e-4 * g_kk.diagonal().mean()
    toward_zero = torch.linalg.solve(g_kk + lam * torch.eye(len(kept), dtype=g_kk.dtype),
                                     (w @ fit.cross[:, kept]).T).T
    assert reconstruction_objective(w, toward_zero, check, kept) > sliced
