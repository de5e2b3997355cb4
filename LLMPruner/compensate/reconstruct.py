"""Local reconstruction of a pruned layer's MLP by gradient steps (``--reconstruct_steps``), after the
sequential refit (``--compensation refit``).

The refit is a least squares on the consumer (``down_proj``) alone: the kept channels' activations stay
as they were. Here, in each pruned layer and on the pruned model's own MLP inputs ``x~`` (captured in the
sequential pass), all of the pruned MLP's weights (``gate_proj``/``up_proj`` rows and ``down_proj``
columns of the kept channels) take ``steps`` Adam steps on ``mean ||MLP~(x~) - MLP(x~)||^2``, where
``MLP`` is the layer's dense MLP: the same objective as the refit (the layer's own output on the pruned
inputs, SparseGPT's), now through the nonlinearity. No labels, no language-model loss, one layer at a
time on the calibration tokens the refit already uses: a local reconstruction, not retraining, but it
does take gradient steps, so it is an explicit option and its figures are reported apart from the
closed-form ones.

Like the refit it is checked on held-out tokens (even positions fit, odd positions judge): a layer
whose held-out error does not fall keeps its refitted weights, so it never makes a layer's
reconstruction worse on tokens it did not fit. The judge also looks ``checks`` times on the way (every
``steps / checks`` steps) and abandons the steps as soon as the held-out error is not below the refit's:
on SmolLM2 that happens only in the lightly pruned layers, where the steps push the error above the
refit's (in most of them by the first look) and the refit would be kept anyway, so the result is the same
and the time is saved (docs/smollm2.md §5). The optimisation runs in float32 on the layer's device
whatever the model's dtype, on at most ``max_tokens`` calibration tokens (a random subset beyond that).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

from LLMPruner.options import RECONSTRUCT_LR as LR, check_reconstruction  # noqa: E402,F401  (one definition, options.py)
MAX_TOKENS = 65_536


@dataclass(frozen=True)
class Reconstruction:
    """How to reconstruct: Adam ``steps`` of ``batch_tokens`` tokens at learning rate ``lr``, the
    held-out error measured ``checks`` times on the way (given up when not below the refit's;
    1 = judged only at the end)."""
    steps: int
    lr: float = LR
    batch_tokens: int = 1024
    max_tokens: int = MAX_TOKENS
    seed: int = 0
    checks: int = 4


def mlp_of(layer: nn.Module, consumer_rel: str) -> tuple[str, nn.Module]:
    """The MLP block of a decoder layer: the module holding the consumer ``consumer_rel`` (e.g.
    ``mlp.down_proj``), which must be a submodule of its own, called on one tensor."""
    rel = consumer_rel.rpartition(".")[0]
    if not rel:
        raise ValueError(f"--reconstruct_steps: the MLP's consumer {consumer_rel!r} sits directly in the decoder "
                         "layer (no MLP submodule to reconstruct on its own); this architecture is not supported")
    return rel, layer.get_submodule(rel)


@torch.no_grad()
def _capture(module: nn.Module, run: Callable[[], None], max_tokens: int, seed: int) -> torch.Tensor:
    xs: list[torch.Tensor] = []

    def grab(m, args, kwargs):
        if len(args) != 1 or kwargs:
            raise ValueError("--reconstruct_steps: this architecture's MLP takes more than one input; "
                             "not supported")
        xs.append(args[0].reshape(-1, args[0].shape[-1]).float())

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    x = torch.cat(xs)
    if len(x) > max_tokens:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values]
    return x


def _error(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    with torch.no_grad():
        return float(sum(((mlp(x[i:i + chunk]) - y[i:i + chunk]) ** 2).sum() for i in range(0, len(x), chunk)))


def reconstruct_mlp(mlp: nn.Module, dense_mlp: nn.Module, x: torch.Tensor, how: Reconstruction) -> str:
    """Fit ``mlp`` (pruned, in place) to ``dense_mlp`` on inputs ``x`` (``[tokens, hidden]``); returns a
    one-line report. Keeps ``mlp`` unchanged unless the held-out (odd-position) error falls."""
    device, dtype = next(mlp.parameters()).device, next(mlp.parameters()).dtype
    work = copy.deepcopy(mlp).float().requires_grad_(True)  # the streamed pass loads frozen weights
    x = x.to(device)
    with torch.no_grad():
        y = torch.cat([dense_mlp(x[i:i + 4096].to(next(dense_mlp.parameters()).dtype)).float()
                       for i in range(0, len(x), 4096)])
    xf, yf, xc, yc = x[0::2], y[0::2], x[1::2], y[1::2]
    before = _error(work, xc, yc)
    looks = max(1, how.checks)
    at = {max(1, how.steps * k // looks) for k in range(1, looks + 1)}  # the last look is at the last step
    last, step = before, 0
    opt = torch.optim.Adam(work.parameters(), lr=how.lr)
    g = torch.Generator().manual_seed(how.seed)
    for step in range(1, how.steps + 1):
        idx = torch.randint(0, len(xf), (min(how.batch_tokens, len(xf)),), generator=g).to(device)
        with torch.enable_grad():
            loss = ((work(xf[idx]) - yf[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if step in at:
            last = _error(work, xc, yc)
            if not (math.isfinite(last) and last < before):
                return (f"reconstruction not better on held-out calibration tokens ({before:.4g} -> {last:.4g} "
                        f"at step {step} of {how.steps}): kept the refit")
    if step == 0:
        return "no reconstruction steps: kept the refit"
    with torch.no_grad():
        for p, q in zip(mlp.parameters(), work.parameters()):
            p.copy_(q.to(dtype))
    return f"reconstruction ({how.steps} steps) lowers the held-out error {before:.4g} -> {last:.4g} " \
           f"({100 * (1 - last / before):.1f} %)"


def reconstruct_layer(layer: nn.Module, dense_layer: nn.Module, consumer_rel: str,
                      forward_all: Callable[[nn.Module], None], how: Reconstruction, name: str) -> None:
    """The sequential pass's step: capture the pruned ``layer``'s MLP inputs (``forward_all(layer)`` runs
    the pruned stream through it) and reconstruct its MLP toward ``dense_layer``'s."""
    rel, mlp = mlp_of(layer, consumer_rel)
    x = _capture(mlp, lambda: forward_all(layer), how.max_tokens, how.seed)
    logger.info("%s%s: %s", name, rel, reconstruct_mlp(mlp, dense_layer.get_submodule(rel), x, how))


def streams_runner(forward: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
                   hidden: Sequence[torch.Tensor]) -> Callable[[nn.Module], None]:
    """``forward_all`` for ``reconstruct_layer``: the layer on every batch of ``hidden``."""
    def run(layer: nn.Module) -> None:
        with torch.no_grad():
            for b, h in enumerate(hidden):
                forward(layer, b, h)
    return run
