"""CPU prefill and decode speed of width- vs depth-pruned models at equal parameter counts.

    python bench/speed.py [--threads 1] [--repeats 5]

The ~60M-parameter random LLaMA (hidden 512, 8 layers, 8 heads, MLP 1376, vocab 32000). Width: 25% of
the heads and MLP channels of every layer (l2). Depth: 2 of the 8 layers (block influence). Both
remove 25% of the decoder parameters. Runs alternate between the models to share the machine's noise.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import random_llama_60m, table

from LLMPruner.select.budget import non_embedding_parameters
from LLMPruner.prune import prune


def prefill_ms(model, ids) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=False)
    return 1000 * (time.perf_counter() - t0)


def decode_tok_s(model, ids, new_tokens) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    calib = torch.randint(3, 32000, (8, 64), generator=torch.Generator().manual_seed(0))
    models = {"dense": random_llama_60m()}
    models["width 25%"] = random_llama_60m()
    prune(models["width 25%"], pruner_type="l2", pruning_ratio=0.25, attention_layers=range(8), mlp_layers=range(8))
    models["depth 2/8 layers"] = random_llama_60m()
    prune(models["depth 2/8 layers"], pruner_type="l2", pruning_ratio=0.0, prune_layers=2, examples=calib)
    ids = torch.randint(3, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    pre = {k: [] for k in models}
    dec = {k: [] for k in models}
    for m in models.values():  # warm-up
        prefill_ms(m, ids[:, :16])
    for _ in range(args.repeats):
        for name, m in models.items():
            pre[name].append(prefill_ms(m, ids))
            dec[name].append(decode_tok_s(m, ids[:, :16], args.new_tokens))
    base = non_embedding_parameters(models["dense"])
    rows = []
    for name, m in models.items():
        p, d = sorted(pre[name])[len(pre[name]) // 2], sorted(dec[name])[len(dec[name]) // 2]
        rows.append({"model": name, "decoder params": non_embedding_parameters(m),
                     "removed": 1 - non_embedding_parameters(m) / base, f"prefill {args.prompt} tok ms": p,
                     "decode tok/s": d})
    for r in rows:
        r["prefill speedup"] = rows[0][f"prefill {args.prompt} tok ms"] / r[f"prefill {args.prompt} tok ms"]
        r["decode speedup"] = r["decode tok/s"] / rows[0]["decode tok/s"]
    print(f"\nmedian of {args.repeats} alternating runs, {args.threads} thread(s), batch 1\n")
    print(table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
