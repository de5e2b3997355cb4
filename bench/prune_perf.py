"""Time and peak memory of pruning, by stage, on stories260K and a random ~60M-parameter LLaMA.

    python bench/prune_perf.py

Each configuration runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own.
"Extra peak" is the peak minus the resident size right after the model was built; it is compared with
the model's weight bytes. The reference's way (``loss.backward()`` over every parameter, scores computed
afterwards from ``.grad``) runs side by side as a baseline.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

from common import STORIES, load_stories, random_llama_60m, table

from LLMPruner.score.estimate import estimate
from LLMPruner.discover import discover
from LLMPruner.select.units import choose, make_plan
from LLMPruner.shrink import apply_plan


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(model_name: str, way: str) -> dict:
    torch.set_num_threads(1)
    model = load_stories()[0] if model_name == "stories260K" else random_llama_60m()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    n_layers = model.config.num_hidden_layers
    examples = torch.randint(3, model.config.vocab_size, (10, 64), generator=torch.Generator().manual_seed(0))
    base = rss_mb()
    t = {}
    t0 = time.perf_counter()
    fams = discover(model).families
    t["discover"] = time.perf_counter() - t0
    fams = [f for f in fams if f.kind in ("attention", "mlp") and 1 <= f.layer < n_layers - 1]
    t0 = time.perf_counter()
    if way == "activations":  # forward + backward with no parameter gradients at all: the activations
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()(examples).requires_grad_()
        model(inputs_embeds=emb, labels=examples).loss.backward()
        scores = {f.key: torch.rand(f.n_units) for f in fams}
    elif way == "streaming":
        scores = estimate(model, fams, pruner_type="taylor", taylor="param_first", examples=examples)
    else:  # the reference: gradients of every parameter held, then scored
        loss = model(input_ids=examples, labels=examples).loss
        loss.backward()
        from LLMPruner.score.estimate import channel_reduce, unit_scores
        params = dict(model.named_parameters())
        chan = {(m.param, m.dim): channel_reduce(params[m.param].detach() * params[m.param].grad, m.dim)
                for f in fams for m in f.members}
        scores = unit_scores(fams, chan)
    t["estimate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = make_plan(model, fams, choose(fams, scores, 0.25))
    t["select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_plan(model, plan)
    t["shrink"] = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model_name, "way": way, "weights MB": weights_mb, **{f"{k} s": v for k, v in t.items()},
            "extra peak MB": peak - base}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(child(sys.argv[1], sys.argv[2])))
        return
    rows = []
    models = (["stories260K"] if STORIES.exists() else []) + ["llama-60M"]
    for name in models:
        for way in ("activations", "streaming", "reference"):
            out = subprocess.run([sys.executable, __file__, name, way], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    for r in rows:
        act = next(x for x in rows if x["model"] == r["model"] and x["way"] == "activations")["extra peak MB"]
        r["(peak - activations) / weights"] = (r["weights MB"] + r["extra peak MB"] - act) / r["weights MB"]
    cols = ["model", "way", "weights MB", "discover s", "estimate s", "select s", "shrink s", "extra peak MB",
            "(peak - activations) / weights"]
    print("\nTaylor param_first, 10 x 64-token samples, ratio 0.25 on layers 1..n-2, one thread\n")
    print(table(rows, cols))


if __name__ == "__main__":
    main()
