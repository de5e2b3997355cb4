"""Speed effect of --round_to: the random ~60M LLaMA pruned to the same budget with and without rounding.

    python bench/round_speed.py [--threads 1] [--repeats 7]

25% of the decoder parameters removed with a global budget (l2 scores), so MLP widths end up uneven
(e.g. 1031, 997, ...); with ``round_to`` 64 every width is a multiple of 64. Prefill latency of 512 tokens,
median of alternating runs. (Odd widths matter most for GPU tensor cores; this measures the CPU.)
"""
from __future__ import annotations

import argparse

import torch

from common import random_llama_60m, table
from speed import prefill_ms

from LLMPruner.select.budget import non_embedding_parameters
from LLMPruner.prune import prune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for r in (1, 8, 64):
        m = random_llama_60m()
        with torch.no_grad():  # uneven magnitudes so that the budget lands unevenly across layers
            for i, layer in enumerate(m.model.layers):
                layer.mlp.down_proj.weight.mul_(1 + 0.3 * i)
        prune(m, pruner_type="l2", param_budget=0.25, round_to=r)
        models[f"round_to {r}"] = m
    ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(1))
    times = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name].append(prefill_ms(m, ids))
    rows = []
    for name, m in models.items():
        widths = [l.mlp.gate_proj.out_features for l in m.model.layers]
        rows.append({"model": name, "decoder params": non_embedding_parameters(m), "MLP widths": widths,
                     "prefill 512 tok ms": sorted(times[name])[args.repeats // 2]})
    print(table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
