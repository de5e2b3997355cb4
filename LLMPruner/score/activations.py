"""Calibration statistics of the inputs of the layers whose input channels are pruned, by forward passes.

For each *consumer* (a 2-D weight whose dim 1, its input channels, is a member of a family: ``o_proj``,
``down_proj``, or every projection for the hidden family) we stream, over any number of calibration
samples: the token count, per-channel sum and sum of squares and, when a least-squares refit is asked
for, the Gram matrix ``X^T X``. Only these statistics are kept, never the activations.

Activation-aware scores (forward passes only):

* ``fluctuation`` (FLAP): per input channel ``var(x_j) * ||W[:, j]||^2``;
* ``wanda`` (Wanda, structured): per input channel ``sum_i |W_ij| * ||x_j||_2``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from LLMPruner.discover import Family

logger = logging.getLogger(__name__)


@dataclass
class InputStats:
    count: int
    total: torch.Tensor            # [in] sum of x
    sq_total: torch.Tensor         # [in] sum of x^2
    gram: torch.Tensor | None      # [in, in] sum of x x^T (float64), only when asked for

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_total / self.count - self.mean ** 2).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_total.sqrt()


def consumers(model: nn.Module, families: list[Family]) -> dict[str, nn.Linear]:
    """``{weight name: Linear}`` for every family member that is a linear layer's input dim."""
    out = {}
    for fam in families:
        for m in fam.members:
            if m.dim == 1 and m.param.endswith(".weight"):
                module = model.get_submodule(m.param.rpartition(".")[0])
                if isinstance(module, nn.Linear):
                    out[m.param] = module
    return out


def input_stats_hook(stats: dict[str, InputStats], name: str, gram: bool = False):
    """A forward pre-hook accumulating the statistics of a module's input into ``stats[name]``."""
    def fn(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        s = stats.get(name)
        if s is None:
            d = x.shape[1]
            s = stats[name] = InputStats(0, x.new_zeros(d), x.new_zeros(d), x.new_zeros(d, d) if gram else None)
        s.count += x.shape[0]
        s.total += x.sum(0)
        s.sq_total += (x * x).sum(0)
        if gram:
            s.gram += x.T @ x
    return fn


@torch.no_grad()
def collect_input_stats(model: nn.Module, targets: dict[str, nn.Linear], examples: torch.Tensor,
                        batch_size: int = 8, gram: bool = False) -> dict[str, InputStats]:
    """Stream ``examples`` ``[N, T]`` through ``model`` and accumulate input statistics of ``targets``."""
    stats: dict[str, InputStats] = {}
    handles = [mod.register_forward_pre_hook(input_stats_hook(stats, name, gram)) for name, mod in targets.items()]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="calibration statistics", leave=False):
            model(input_ids=examples[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def activation_channel_scores(model: nn.Module, families: list[Family], stats: dict[str, InputStats],
                              metric: str) -> dict[tuple[str, int], torch.Tensor]:
    """Per input channel scores of every consumer (keyed like ``estimate``'s channel scores)."""
    params = dict(model.named_parameters())
    out = {}
    for name, s in stats.items():
        w = params[name].detach().double().cpu()
        if metric == "fluctuation":
            out[(name, 1)] = (s.var.cpu() * (w * w).sum(0)).float()
        elif metric == "wanda":
            out[(name, 1)] = (w.abs().sum(0) * s.norm.cpu()).float()
        else:
            raise ValueError(f"activation metric {metric!r}: choose fluctuation or wanda")
    return out
