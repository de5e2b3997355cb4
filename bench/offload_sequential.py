"""One-shot vs sequential compensation under --offload, on stories260K: calibration loss of the saved model.

    python bench/offload_sequential.py

16 x 64 TinyStories calibration tokens; 50 % / 25 % of the MLP channels of every layer and of the heads
of layers 1-3. One-shot: every layer's statistics from the dense model (the in-memory decisions);
sequential: layer i's statistics on the outputs of the already pruned and compensated layers 0..i-1.
"""
from __future__ import annotations

import tempfile

import torch

from common import STORIES, TINYSTORIES, require_shared, table

from LLMPruner import load_model, load_pruned
from LLMPruner.data.calibration import calibration_examples
from LLMPruner.stream.pipeline import prune_offloaded

RUNS = [("none", False), ("refit", False), ("refit", True), ("bias", False), ("bias", True)]


def loss_after(examples, **kw) -> float:
    with tempfile.TemporaryDirectory() as d:
        prune_offloaded(STORIES, save_to=d, examples=examples, attention_layers=range(1, 4),
                        mlp_layers=range(0, 5), **kw)
        model, _ = load_pruned(d)
        with torch.no_grad():
            return model(examples, labels=examples).loss.item()


def main() -> None:
    require_shared()
    torch.set_num_threads(1)
    _, tokenizer = load_model(STORIES)
    examples = calibration_examples(str(TINYSTORIES), tokenizer, 16, 64, 0)
    rows = []
    for pruner_type in ("taylor", "l2", "wanda", "fluctuation"):
        for ratio in (0.5, 0.25):
            row = {"scores": pruner_type, "ratio": ratio}
            for comp, seq in RUNS:
                row[f"{comp}{' sequential' if seq else ''}"] = loss_after(
                    examples, pruner_type=pruner_type, pruning_ratio=ratio, compensation=comp, sequential=seq)
            rows.append(row)
    print("calibration loss of the saved model (stories260K, 16 x 64 tokens)")
    print(table(rows, ["scores", "ratio", "none", "refit", "refit sequential", "bias", "bias sequential"]))


if __name__ == "__main__":
    main()
