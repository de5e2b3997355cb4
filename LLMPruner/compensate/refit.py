"""Output compensation: after a consumer layer loses input channels, keep its output on calibration data.

For a linear layer ``y = W x`` whose input channels ``R`` are removed and ``K`` kept:

* ``bias`` (FLAP's baseline compensation): ``b += W[:, R] @ mean(x_R)`` — exact whenever the removed
  inputs are constant. Adds bias tensors: the adapter switches the architecture's bias flags on (zero
  biases elsewhere) so the checkpoint still loads with stock classes, but it is no longer the original
  bias-free architecture.
* ``refit`` (sequential least squares, ``sequential.py``): layer by layer, on the inputs ``x~`` the
  *pruned* model produces: ``V = (W D[:, K] + lam W_K) (G~_KK + lam I)^-1`` with ``G~ = sum x~ x~^T`` and
  ``D = sum x x~^T``, minimising ``sum_t ||W x_t - V x~_t,K||^2 + lam ||V - W_K||^2`` (``x = x~`` by
  default, SparseGPT's objective; the dense model's ``x`` as an option): the ridge pulls the kept columns
  toward their dense values, as the damped OBS update does (``obs.py``); kept only where
  it lowers that calibration error below plain slicing's (``refit_layer``). No new tensors: the
  architecture stays stock. Needs more calibration tokens than the widest refitted input (refused
  otherwise). **Recommended.**
* ``refit_oneshot`` (not a user's choice: the layer-streamed pass's refit without ``--offload_sequential``,
  and its in-memory reference in the tests): the same least squares from the dense model's Gram alone
  (``W_K <- W G[:, K] (G_KK + lam I)^-1``), all layers at once: errors compound across layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from LLMPruner.score.activations import InputStats
from LLMPruner.adapters import get_adapter
from LLMPruner.plan import PruningPlan

logger = logging.getLogger(__name__)

Compensation = Literal["none", "bias", "refit", "refit_oneshot"]
from LLMPruner.options import COMPENSATIONS, ONESHOT_REFIT  # noqa: E402,F401  (re-exported)


@torch.no_grad()
def compensate(model: nn.Module, plan: PruningPlan, stats: dict[str, InputStats], method: Compensation,
               ridge: float = 1e-3) -> dict[str, torch.Tensor]:
    """Call *before* the plan is applied. ``refit`` rewrites the kept columns in place; ``bias`` returns
    ``{module name: bias delta}`` for ``add_biases`` to add *after* the plan (the new biases must not
    exist while the plan slices the other projections)."""
    if method in ("none", "refit", None):  # "refit" runs layer by layer (sequential.py)
        return {}
    if method not in COMPENSATIONS + (ONESHOT_REFIT,):
        raise ValueError(f"--compensation {method!r}: choose one of {', '.join(COMPENSATIONS)}")
    params = dict(model.named_parameters())
    deltas = {}
    for name, s in stats.items():
        keep = plan.keep.get(name, {}).get(1)
        if keep is None or len(keep) == params[name].shape[1]:
            continue
        w = params[name]
        kept = torch.as_tensor(keep)
        removed = torch.as_tensor(sorted(set(range(w.shape[1])) - set(keep)))
        if method == "bias":
            deltas[name.rpartition(".")[0]] = w[:, removed].detach().double().cpu() @ s.mean[removed].cpu()
        else:  # refit_oneshot
            w[:, kept] = refit_weight(w.detach().double().cpu(), s.gram.cpu(), kept, ridge).to(w.dtype).to(w.device)
    logger.info("%s compensation of %d layers", method, len(deltas) if method == "bias" else len(stats))
    return deltas


@torch.no_grad()
def add_biases(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add bias deltas (from ``compensate(..., "bias")``), creating the biases the architecture allows."""
    adapter = get_adapter(model)
    for module_name, delta in deltas.items():
        module = model.get_submodule(module_name)
        if module.bias is None:
            adapter.enable_biases(model, adapter.kind_of(module_name + ".weight"))
        module.bias += delta.to(module.bias.dtype).to(module.bias.device)


def refit_weight(w: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_V sum_t ||W x_t - V x_t[kept]||^2 + lam ||V||^2`` = ``W G[:, K] (G_KK + lam I)^-1``."""
    g_kk = gram[kept][:, kept]
    lam = ridge * g_kk.diagonal().mean().clamp_min(1e-12)
    a = g_kk + lam * torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    rhs = (w @ gram[:, kept]).T                                  # [K, out]
    return torch.linalg.solve(a, rhs).T                          # [out, K]



def linalg_place(device: str | torch.device | None) -> torch.device:
    """Where the refit's and OBS's float64 matrices live: ``device`` (``--linalg_device``), or the host."""
    return torch.device("cpu") if device is None else torch.device(device)


@dataclass
class CrossStats:
    """Streamed statistics of one consumer's inputs in both streams: ``x`` (dense model), ``x~`` (pruned).

    ``gram`` = ``sum x~ x~^T``, ``cross`` = ``sum x x~^T`` (rows: dense channels, columns: pruned), both
    ``[in, in]`` float64; ``total`` = ``sum x~``; ``count`` tokens. ``cross`` is None when the target is
    the pruned stream itself (``x = x~``, the default refit): it would equal ``gram``, and a second
    ``[in, in]`` float64 matrix per half is what dominates the refit's host memory on wide MLPs (3.5 GB
    for Llama-3-70B's 28,672 inputs); ``dense_cross`` reads either. ``extra`` (``[out, in]``, optional) =
    ``sum e x~^T``: an additive output target ``e`` per token (the fit is then ``V x~_K ~ W x + e``; the
    sequential ``residual`` target puts the residual stream's accumulated error there). The sums live on
    ``gram.device``: the host by default, the GPU with ``--linalg_device cuda`` (``empty(device=)``)."""
    count: int
    total: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor | None
    extra: torch.Tensor | None = None

    @classmethod
    def empty(cls, width: int, dense: bool = True, device: str | torch.device | None = None) -> "CrossStats":
        """Zero statistics of ``width`` inputs on ``device`` (default: the host); ``dense=False``: no
        separate dense stream (``x = x~``)."""
        device = linalg_place(device)
        z = torch.zeros(width, width, dtype=torch.float64, device=device)
        return cls(0, torch.zeros(width, dtype=torch.float64, device=device), z, z.clone() if dense else None)

    @property
    def dense_cross(self) -> torch.Tensor:
        """``sum x x~^T``: ``cross``, or ``gram`` when the two streams are one."""
        return self.gram if self.cross is None else self.cross

    def merged(self, other: "CrossStats") -> "CrossStats":
        if (self.cross is None) != (other.cross is None):
            raise ValueError("CrossStats.merged: one side has a dense stream and the other has not")
        extra = None if self.extra is None and other.extra is None else (
            (0 if self.extra is None else self.extra) + (0 if other.extra is None else other.extra))
        cross = None if self.cross is None else self.cross + other.cross
        return CrossStats(self.count + other.count, self.total + other.total, self.gram + other.gram,
                          cross, extra)

    def add(self, x: torch.Tensor | None, xp: torch.Tensor, e: torch.Tensor | None = None) -> None:
        """``x`` (dense stream; None without one), ``xp``: ``[tokens, in]``; ``e``: ``[tokens, out]``
        additive targets (float32 products, float64 sums)."""
        if (x is None) != (self.cross is None):
            raise ValueError("CrossStats.add: pass the dense inputs x exactly when the statistics have a "
                             "dense stream (CrossStats.empty(width, dense=True))")
        assert x is None or x.shape == xp.shape, (x.shape, xp.shape)
        self.count += xp.shape[0]
        here = self.gram.device                         # moved first: no float64 copy on a device it is not on
        self.total += xp.sum(0).to(here).double()
        self.gram += (xp.T @ xp).to(here).double()
        if x is not None:
            self.cross += (x.T @ xp).to(here).double()
        if e is not None:
            term = (e.T @ xp).to(here).double()
            self.extra = term if self.extra is None else self.extra + term


def reconstruction_objective(w: torch.Tensor, v: torch.Tensor, stats: CrossStats, kept: torch.Tensor) -> float:
    """``sum_t ||y_t - V x~_t,K||^2`` (``y = W x``, ``+ e`` with ``extra``) minus its ``V``-independent
    part ``sum_t ||y_t||^2``."""
    return _objective(v, *_kept_target(w, (stats,), kept))


def _objective(v: torch.Tensor, g_kk: torch.Tensor, b: torch.Tensor) -> float:
    return float(-2.0 * (v * b).sum() + ((v @ g_kk) * v).sum())


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _kept_target(w: torch.Tensor, parts: tuple[CrossStats, ...], kept: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G~_KK, sum_t y_t x~_t,K^T)`` for the target ``y = W x (+ e)`` (``[K, K]``, ``[out, K]``), the
    statistics summed over ``parts`` after indexing: the numbers ``merged`` would give, without its
    ``[in, in]`` copies."""
    g_kk = sum(p.gram[kept][:, kept] for p in parts)
    b = w @ sum(p.dense_cross[:, kept] for p in parts)
    extras = [p.extra[:, kept] for p in parts if p.extra is not None]
    return g_kk, (b + sum(extras) if extras else b)


def solve_refit(w: torch.Tensor, stats: CrossStats | tuple[CrossStats, ...], kept: torch.Tensor,
                ridge: float) -> torch.Tensor:
    """``V = (W D[:, K] + lam W_K) (G~_KK + lam I)^-1``, ``lam = ridge * mean diag(G~_KK)``: ``[out, K]``.
    ``stats`` may come in parts (the fit and check halves), summed on the kept columns only.

    The ridge shrinks ``V`` toward the kept columns ``W_K`` (plain slicing, its limit for a large ridge),
    not toward zero: with the Gram's own damping this is the damped OBS update (``obs.py``). Toward zero,
    a Gram whose mean diagonal one massive channel sets (SmolLM2's layer 11 writes the attention sink's
    activation, 23,000 vs ~30 elsewhere) shrank every other column so far that even the smallest ridge
    lost to slicing on held-out tokens; toward ``W_K`` the refit wins there, and the SmolLM2 perplexities
    improve (docs/smollm2.md §6)."""
    return _solve(w, kept, *_kept_target(w, stats if isinstance(stats, tuple) else (stats,), kept), ridge)


def _solve(w: torch.Tensor, kept: torch.Tensor, g_kk: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * g_kk.diagonal().mean().clamp_min(1e-12)
    a = g_kk + lam * torch.eye(len(kept), dtype=g_kk.dtype, device=g_kk.device)
    return torch.linalg.solve(a, (target + lam * w[:, kept]).T).T


def refit_layer(w: torch.Tensor, stats: CrossStats, kept: torch.Tensor, ridge: float | None = None,
                check: CrossStats | None = None) -> tuple[torch.Tensor, str]:
    """Refit a consumer's kept columns; ``w``: ``[out, in]`` float64 dense weight, ``kept``: ``[K]``.

    With ``check`` (statistics of held-out calibration tokens) the ridge is chosen from ``RIDGES`` (or
    is ``ridge``) by the held-out reconstruction error, the refit is kept only if it beats plain slicing
    there, and the final solve uses all tokens. Without, the same test runs on ``stats`` itself.
    Returns the new ``[out, K]`` columns and a one-line report. ``w``, the statistics and ``kept`` share
    a device (the host, or the GPU with ``--linalg_device``); so do the new columns. The kept-column
    statistics of each half are indexed and multiplied by ``W`` once for the whole ridge grid (the same
    numbers as ``solve_refit`` / ``reconstruction_objective`` per ridge, ~2 fewer ``[out, in] x [in, K]``
    products per ridge)."""
    fitted = _kept_target(w, (stats,), kept)
    judged = _kept_target(w, (check,), kept) if check is not None else fitted
    base = _objective(w[:, kept], *judged)
    tried = {}
    for r in ((ridge,) if ridge is not None else RIDGES):
        v = _solve(w, kept, *fitted, r)
        if torch.isfinite(v).all():
            tried[r] = _objective(v, *judged)
    best = min(tried, key=tried.get) if tried else None
    if best is None or not tried[best] < base:
        return w[:, kept].clone(), f"refit not better on held-out calibration tokens: sliced only"
    v = solve_refit(w, (stats, check) if check is not None else stats, kept, best)
    return v, (f"refit (ridge {best:g}) lowers the held-out error by {base - tried[best]:.4g} "
               f"({len(kept)}/{w.shape[1]} inputs kept)")
