"""Reconstruction-optimal structured selection: structured Optimal Brain Surgeon (OBS) in the sequential pass.

For a consumer ``y = W x`` (``down_proj``: one input column per MLP channel; ``o_proj``: a KV group's
columns) and the pruned model's own inputs ``X`` (``[tokens, in]``), ``H = X^T X + lam I``
(``lam = damp * mean diag(X^T X)``). Removing the columns ``B`` of one unit and re-solving the remaining
columns optimally costs (ZipLM, SlimGPT, "structured OBS")

    E_B = tr(W_B [H^-1]_BB^-1 W_B^T)          (one column j: ||W[:, j]||^2 / [H^-1]_jj)

and the optimal update of the other columns is ``W -= W_B [H^-1]_BB^-1 [H^-1]_B,:``; ``H^-1`` is then
downdated by the same Schur complement, ``H^-1 -= [H^-1]_:,B [H^-1]_BB^-1 [H^-1]_B,:``, which is the
inverse of ``H`` with ``B`` deleted. Greedy: remove the unit of smallest ``E_B``, update, repeat. After any
sequence of removals the kept columns equal the least-squares refit ``W H[:, K] H_KK^-1`` (tested).

The score reported and ranked is ``E_B - lam ||W_B||^2``: the reconstruction error on the calibration
tokens plus the damping's penalty on the change of the *kept* columns (the damping's penalty on zeroing
the removed columns themselves is not an error). It is exactly 0 for a unit whose columns are zero or whose
inputs are never active (those are removed first, and removing them changes no output).

``obs_select`` is the per-consumer selection; ``obs_reselect`` the hook of ``sequential.sequential_prune``
(``reselect=``): in each pruned layer it re-chooses the same number of units per family from the pruned
model's inputs; the sequential pass's refit then writes the kept columns (``compensate.refit_layer``: the
same least squares, its ridge chosen on held-out tokens, or plain slicing when that is not better).
"""
from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
import torch.nn as nn

from LLMPruner.compensate.refit import CrossStats, linalg_place
from LLMPruner.discover import Family

logger = logging.getLogger(__name__)

Selection = Literal["score", "obs"]
from LLMPruner.options import DAMP, SELECTIONS, check_selection  # noqa: E402,F401  (re-exported)


def damped(gram: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, float]:
    """``(H, lam)``: ``H = gram + lam I``, ``lam = damp * mean diag(gram)``, in float64."""
    g = gram.double()
    lam = float(damp * g.diagonal().mean().clamp_min(1e-12)) if damp > 0 else 0.0
    return g + lam * torch.eye(g.shape[0], dtype=torch.float64, device=g.device), lam


def damped_inverse(gram: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, float]:
    """``(H^-1, lam)`` for ``H = gram + lam I``, ``lam = damp * mean diag(gram)``, in float64."""
    h, lam = damped(gram, damp)
    return torch.cholesky_inverse(torch.linalg.cholesky(h)), lam


def unit_errors(w: torch.Tensor, hinv: torch.Tensor, columns: torch.Tensor, lam: float,
                alive: torch.Tensor | None = None) -> torch.Tensor:
    """``E_B - lam ||W_B||^2`` for every unit (rows of ``columns``, ``[units, k]``): ``[units]``; units not
    ``alive`` (already removed) get ``inf``."""
    wf = w
    if alive is not None and columns.shape[1] == 1:   # one column per unit: no copies (removed: 0 / 0)
        sq = (w * wf).sum(0)[columns[:, 0]]
        err = sq / hinv.diagonal()[columns[:, 0]] - lam * sq
        return torch.where(alive, err, torch.full_like(err, float("inf")))
    if alive is not None:
        out = torch.full((columns.shape[0],), float("inf"), dtype=w.dtype, device=w.device)
        out[alive] = unit_errors(w, hinv, columns[alive], lam)
        return out
    wb, wbf = w[:, columns], wf[:, columns]                                 # [out, U, k]
    hbb = hinv[columns[:, :, None], columns[:, None, :]]                    # [U, k, k]
    if columns.shape[1] == 1:
        sq = (wb * wbf)[..., 0].sum(0)                                      # [U]
        return sq / hbb[:, 0, 0] - lam * sq
    sol = torch.linalg.solve(hbb, wb.permute(1, 2, 0))                      # [U, k, out] = Hbb^-1 W_B^T
    err = (wbf.permute(1, 2, 0) * sol).sum((1, 2))
    return err - lam * (wb * wbf).sum((0, 2))


def remove_unit(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """Remove the columns ``cols`` in place: optimal update of ``w``'s other columns, downdate ``hinv``."""
    if len(cols) == 1:
        j = int(cols[0])
        row = hinv[j] / hinv[j, j]
        w.sub_(torch.outer(w[:, j], row))
        hinv.sub_(torch.outer(hinv[:, j], row))
    else:
        rows = torch.linalg.solve(hinv[cols][:, cols], hinv[cols])          # [k, in] = Hbb^-1 Hinv_B,:
        w -= w[:, cols] @ rows
        hinv -= hinv[:, cols] @ rows
    w[:, cols] = 0.0
    hinv[cols, :] = 0.0
    hinv[:, cols] = 0.0


def obs_select(w: torch.Tensor, gram: torch.Tensor, columns: torch.Tensor, n_remove: int,
               damp: float = DAMP, prior: torch.Tensor | None = None, prior_weight: float = 0.0
               ) -> tuple[list[int], torch.Tensor, list[float]]:
    """Greedy structured OBS on one consumer.

    ``w``: ``[out, in]``; ``gram``: ``X^T X`` of its inputs (``[in, in]``); ``columns``: ``[units, k]`` the
    input columns of each unit; ``n_remove`` units go. With ``prior`` (another per-unit score, e.g.
    Taylor's) the ranking is ``E / mean(E) + prior_weight * prior / mean(prior)`` over the units left.
    Returns (removed units in removal order, the updated ``w`` (float64, removed columns zero), the
    error of each removal). Computed on ``w``'s device (``gram`` and ``prior`` go there)."""
    if not 0 <= n_remove < columns.shape[0]:
        raise ValueError(f"obs_select: n_remove {n_remove} must be in [0, {columns.shape[0]})")
    device = w.device
    gram, columns = gram.to(device), columns.to(device)
    prior = None if prior is None else prior.to(device)
    if columns.shape[1] == 1:
        return _greedy_columns(w, gram, columns[:, 0], n_remove, damp, prior, prior_weight)
    w = w.detach().double().clone()
    hinv, lam = damped_inverse(gram, damp)
    alive = torch.ones(columns.shape[0], dtype=torch.bool, device=device)
    removed, errors = [], []
    for _ in range(n_remove):
        err = unit_errors(w, hinv, columns, lam, alive).clamp_min(0.0)
        rank = err
        if prior is not None and prior_weight:
            e, p = err[alive], prior.double()[alive]
            rank = err / e.mean().clamp_min(1e-30) + prior_weight * prior.double() / p.abs().mean().clamp_min(1e-30)
            rank[~alive] = float("inf")
        u = int(torch.argmin(rank))
        errors.append(float(err[u]))
        remove_unit(w, hinv, columns[u])
        alive[u] = False
        removed.append(u)
    return removed, w, errors


@torch.no_grad()
def _greedy_columns(w: torch.Tensor, gram: torch.Tensor, cols: torch.Tensor, n_remove: int, damp: float,
                    prior: torch.Tensor | None = None, prior_weight: float = 0.0
                    ) -> tuple[list[int], torch.Tensor, list[float]]:
    """``obs_select`` for one column per unit, with the updates kept low-rank: after ``t`` removals
    ``H^-1 = H0^-1 - U U^T`` and ``W = W0 - A U^T``, ``u = H^-1[:, j] / sqrt(H^-1_jj)``,
    ``a = W[:, j] / sqrt(H^-1_jj)``. Column norms and ``diag H^-1`` are updated in ``O(in * t)`` per
    removal instead of two dense rank-1 updates (same greedy choices, float64)."""
    w0 = w.detach().double()
    hinv0, lam = damped_inverse(gram, damp)
    d, dev = w0.shape[1], w0.device
    U = torch.zeros(d, n_remove, dtype=torch.float64, device=dev)
    A = torch.zeros(w0.shape[0], n_remove, dtype=torch.float64, device=dev)
    norm0 = (w0 * w0).sum(0)
    cross = torch.zeros(d, dtype=torch.float64, device=dev)   # sum_i (W0^T a_i) * u_i
    quad = torch.zeros(d, dtype=torch.float64, device=dev)    # U_j (A^T A) U_j^T
    diag = hinv0.diagonal().clone()
    alive = torch.zeros(d, dtype=torch.bool, device=dev)
    alive[cols] = True
    removed, errors = [], []
    for t in range(n_remove):
        sq = norm0 - 2.0 * cross + quad
        err = (sq / diag - lam * sq).clamp_min(0.0)
        err = torch.where(alive, err, torch.full_like(err, float("inf")))
        rank = err
        if prior is not None and prior_weight:
            p = torch.zeros(d, dtype=torch.float64, device=dev)
            p[cols] = prior.double()
            rank = err / err[alive].mean().clamp_min(1e-30) + prior_weight * p / p[alive].abs().mean().clamp_min(1e-30)
        j = int(torch.argmin(rank))
        errors.append(float(err[j]))
        h_col = hinv0[:, j] - U[:, :t] @ U[j, :t]
        w_col = w0[:, j] - A[:, :t] @ U[j, :t]
        scale = h_col[j].clamp_min(1e-300).rsqrt()
        u, a = h_col * scale, w_col * scale
        fa = a
        q = A[:, :t].T @ fa
        quad += 2.0 * (U[:, :t] @ q) * u + (a @ fa) * u * u
        cross += (w0.T @ fa) * u
        diag -= u * u
        U[:, t], A[:, t] = u, a
        alive[j] = False
        removed.append(int((cols == j).nonzero()[0, 0]))
    out = w0 - A @ U.T
    out[:, cols[removed]] = 0.0
    return removed, out, errors


def consumer_columns(fam: Family, consumer: str) -> torch.Tensor:
    """The ``[units, k]`` input columns of ``consumer`` that each unit of ``fam`` holds."""
    cols = [m.indices for m in fam.members if m.param == consumer and m.dim == 1]
    if len(cols) != 1:
        raise ValueError(f"{fam.key}: expected one input member on {consumer}, found {len(cols)}")
    return cols[0].long()


def obs_reselect(damp: float = DAMP, priors: dict[str, torch.Tensor] | None = None,
                 prior_weight: float = 0.0, device: str | torch.device | None = None) -> Callable:
    """The ``reselect`` hook of ``sequential_prune``: per family of the consumer, the same number of units
    as ``chosen``, by greedy structured OBS on the pruned model's inputs (``stats.gram``). At most one
    family per consumer may lose units (a layer loses KV groups or query heads, never both). ``device``:
    where the float64 linear algebra runs (default: the host; ``--linalg_device``)."""
    where = linalg_place(device)

    def reselect(model: nn.Module, group: list[Family], chosen: dict[str, list[int]], consumer: str,
                 stats: CrossStats) -> dict[str, list[int]]:
        w = dict(model.named_parameters())[consumer].detach().double().to(where)
        gram = stats.gram
        out = {}
        if sum(1 for f in group if chosen.get(f.key)) > 1:
            raise ValueError(f"OBS selection: {consumer} loses units of several families "
                             f"({[f.key for f in group if chosen.get(f.key)]}); only one is supported")
        for fam in group:
            n = len(chosen.get(fam.key, []))
            if n == 0:
                out[fam.key] = []
                continue
            cols = consumer_columns(fam, consumer)
            prior = priors.get(fam.key) if priors else None
            units, _, errors = obs_select(w, gram, cols, n, damp, prior, prior_weight)
            out[fam.key] = sorted(units)
            logger.info("%s: OBS removes %d units, reconstruction error %.4g (first %.3g, last %.3g)",
                        fam.key, n, sum(errors), errors[0], errors[-1])
        return out
    return reselect
