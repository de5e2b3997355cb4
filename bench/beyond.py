"""Beyond LLM-Pruner: retraining-free compensation, activation-aware scores, global budget, depth pruning.

    python bench/beyond.py [--num_examples 128]

stories260K with 20% and 35% of the non-embedding parameters removed, no fine-tuning. Calibration from
the first 20% of ../shared/data/tinystories, perplexity on the rest (128-token windows). The paper's
estimators (random, param_first, param_mix) prune every layer by the same ratio (the reference's
mode); the others use one global parameter budget.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import load_stories, require_shared, split_stories, table

from LLMPruner.select.budget import non_embedding_parameters
from LLMPruner.data.calibration import calibration_examples
from LLMPruner.evaluate.ppl import perplexity
from LLMPruner.prune import prune

ALL = dict(attention_layers=range(0, 5), mlp_layers=range(0, 5))


def settings(budget: float) -> list[tuple[str, dict, str]]:
    """(name, prune() kwargs, which calibration set)."""
    depth_layers = 1  # of 5 layers: 20% of the non-embedding parameters
    rows = [
        ("random (paper, uniform ratio)", dict(pruner_type="random", pruning_ratio=budget, **ALL), "paper"),
        ("taylor param_first (paper)", dict(pruner_type="taylor", pruning_ratio=budget, **ALL), "paper"),
        ("taylor param_mix (paper)", dict(pruner_type="taylor", taylor="param_mix", pruning_ratio=budget, **ALL), "paper"),
        ("param_first + global budget", dict(pruner_type="taylor", param_budget=budget), "paper"),
        ("param_first + budget + refit", dict(pruner_type="taylor", param_budget=budget, compensation="refit"), "many"),
        ("wanda + budget", dict(pruner_type="wanda", param_budget=budget), "many"),
        ("fluctuation + budget", dict(pruner_type="fluctuation", param_budget=budget), "many"),
        ("fluctuation + budget + bias (FLAP)", dict(pruner_type="fluctuation", param_budget=budget,
                                                    compensation="bias"), "many"),
        ("fluctuation + budget + refit", dict(pruner_type="fluctuation", param_budget=budget,
                                              compensation="refit"), "many"),
        ("wanda + budget + refit", dict(pruner_type="wanda", param_budget=budget, compensation="refit"), "many"),
        ("fluctuation + budget + refit, round_to 8", dict(pruner_type="fluctuation", param_budget=budget,
                                                          compensation="refit", round_to=8), "many"),
        ("depth (block influence) + fluct/refit width", dict(pruner_type="fluctuation", param_budget=budget,
                                                            compensation="refit", prune_layers=depth_layers), "many"),
        ("depth (ppl) + fluct/refit width", dict(pruner_type="fluctuation", param_budget=budget, compensation="refit",
                                                 prune_layers=depth_layers, layer_importance="ppl"), "many"),
        ("depth only (block influence)" if budget <= 0.2 else "depth 2 layers (block influence)",
         dict(pruner_type="l2", pruning_ratio=0.0, prune_layers=1 if budget <= 0.2 else 2), "many"),
    ]
    for _, kwargs, _ in rows:  # the rows above measure the adaptive (z-score) ranking, as they always did
        if "param_budget" in kwargs:
            kwargs.setdefault("budget_criterion", "zscore")
    return rows + [
        ("wanda + budget + refit_oneshot (dense statistics)",
         dict(pruner_type="wanda", param_budget=budget, compensation="refit_oneshot", budget_criterion="zscore"),
         "many"),
        ("wanda + uniform budget + refit", dict(pruner_type="wanda", param_budget=budget, compensation="refit",
                                                budget_criterion="uniform"), "many"),
        ("taylor + uniform budget + refit", dict(pruner_type="taylor", param_budget=budget, compensation="refit",
                                                 budget_criterion="uniform"), "many"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_examples", type=int, default=128, help="calibration samples of the new methods")
    ap.add_argument("--budgets", default="0.2,0.35")
    args = ap.parse_args()
    require_shared()
    torch.set_num_threads(1)
    calib, held = split_stories(Path(tempfile.mkdtemp()))
    model, tok = load_stories()
    ids = tok(held.read_text(), return_tensors="pt").input_ids[0]
    data = {"paper": calibration_examples(str(calib), tok, 10, 64, seed=0),  # the reference's 10 x 64
            "many": calibration_examples(str(calib), tok, args.num_examples, 128, seed=0)}
    base = non_embedding_parameters(model)
    dense = perplexity(model, ids, 128, batch_size=16)
    rows = [{"budget": 0.0, "method": "dense", "removed": 0.0, "ppl": dense, "Δppl / param_first's": ""}]
    for budget in [float(b) for b in args.budgets.split(",")]:
        first = None
        for name, kwargs, calib_set in settings(budget):
            model, _ = load_stories()
            t0 = time.perf_counter()
            prune(model, mode="block_wise", examples=data[calib_set], **kwargs)
            secs = time.perf_counter() - t0
            ppl = perplexity(model, ids, 128, batch_size=16)
            first = ppl - dense if "param_first (paper)" in name else first
            rows.append({"budget": budget, "method": name, "removed": 1 - non_embedding_parameters(model) / base,
                         "ppl": ppl, "Δppl / param_first's": (ppl - dense) / first if first else "",
                         "calibration": "10x64" if calib_set == "paper" else f"{args.num_examples}x128",
                         "wall s": secs})
            print(rows[-1], flush=True)
    print(f"\nstories260K, held-out TinyStories PPL ({ids.numel()} tokens, 128-token windows), no fine-tuning\n")
    print(table(rows, ["budget", "method", "removed", "ppl", "Δppl / param_first's", "calibration", "wall s"]))


if __name__ == "__main__":
    main()
