"""Quality of the paper's estimators on stories260K: held-out TinyStories perplexity after pruning.

    python bench/quality.py [--num_examples 10] [--ratios 0.25,0.5]

Block-wise, layers 1-3 (ranges 1..4), no fine-tuning; calibration from the first 20% of
../shared/data/tinystories, perplexity on the remaining 80% in 128-token windows.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import load_stories, require_shared, split_stories, table

from LLMPruner.data.calibration import calibration_examples
from LLMPruner.evaluate.ppl import perplexity
from LLMPruner.prune import prune
from LLMPruner.shrink import count_parameters

METHODS = [("random", "-"), ("l1", "-"), ("l2", "-"), ("taylor", "vectorize"), ("taylor", "param_first"),
           ("taylor", "param_second"), ("taylor", "param_mix")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_examples", type=int, default=10)
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--seeds", type=int, default=3, help="random pruning is averaged over this many seeds")
    args = ap.parse_args()
    require_shared()
    torch.set_num_threads(1)
    calib, held = split_stories(Path(tempfile.mkdtemp()))
    model, tok = load_stories()
    ids = tok(held.read_text(), return_tensors="pt").input_ids[0]
    examples = calibration_examples(str(calib), tok, args.num_examples, 64, seed=0)
    dense = perplexity(model, ids, 128, batch_size=16)
    rows = [{"ratio": 0.0, "method": "dense", "params": count_parameters(model), "ppl": dense}]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for pruner, taylor in METHODS:
            seeds = range(args.seeds) if pruner == "random" else [0]
            ppls, secs = [], []
            for seed in seeds:
                model, _ = load_stories()
                t0 = time.perf_counter()
                prune(model, mode="block_wise", pruning_ratio=ratio, pruner_type=pruner,
                      taylor=taylor if taylor != "-" else "param_first", attention_layers=range(1, 4),
                      mlp_layers=range(1, 4), examples=examples, seed=seed)
                secs.append(time.perf_counter() - t0)
                ppls.append(perplexity(model, ids, 128, batch_size=16))
            name = pruner if taylor == "-" else f"taylor/{taylor}"
            if len(seeds) > 1:
                name += f" (mean of {len(seeds)} seeds)"
            rows.append({"ratio": ratio, "method": name, "params": count_parameters(model),
                         "ppl": sum(ppls) / len(ppls), "prune s": sum(secs) / len(secs)})
            print(rows[-1], flush=True)
    print(f"\nstories260K, block-wise layers 1-3, {args.num_examples} calibration samples x 64 tokens, "
          f"held-out TinyStories PPL ({ids.numel()} tokens, 128-token windows)\n")
    print(table(rows, ["ratio", "method", "params", "ppl", "prune s"]))


if __name__ == "__main__":
    main()
