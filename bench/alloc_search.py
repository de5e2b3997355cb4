"""Exploration: per-layer MLP counts at 118.6M chosen by a search on the stitched model's KL (EvoPress-style).

    python bench/alloc_search.py [--model /tmp/smollm2_fp32] [--proposals 150] [--out /tmp/alloc.json]

Database: for every pruned layer (MLP, layers 4..27), greedy structured OBS on the dense model's inputs
(128 x 128 C4 tokens) gives a removal order; a layer at count ``c`` is its first ``c`` removals with the
optimal update of the kept columns. Fitness: mean KL(dense || stitched model) on 16 x 128 other C4 tokens,
the stitched model having every layer at its count (one-shot, each layer refitted on dense inputs).
Prints the fitness of the uniform, ``residual`` and ``kl`` allocations, then hill-climbs from the best of
them by moving ``--step`` channels between two random layers (kept if the fitness falls). The counts
found can be handed to the sequential OBS pass (``--counts`` of bench/obs_explore.py's ``counts=`` key).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import C4, TARGETS, _budget  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/tmp/smollm2_fp32")
    p.add_argument("--proposals", type=int, default=150)
    p.add_argument("--step", type=int, default=64)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out", default="/tmp/alloc_search.json")
    p.add_argument("--start", default=None, help="a JSON file of counts to start from")
    args = p.parse_args()
    from LLMPruner.activations import collect_input_stats, consumers
    from LLMPruner.checkpoint import load_model
    from LLMPruner.data.calibration import calibration_examples
    from LLMPruner.graph import discover
    from LLMPruner.obs import consumer_columns, obs_select
    from LLMPruner.obs_allocation import obs_counts
    from LLMPruner.obs_measured import _logprobs, refit_kept
    from LLMPruner.stream.states import capture

    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    examples = calibration_examples(str(C4), tok, 128, 128, seed=0)
    held = calibration_examples(str(C4), tok, args.windows, 128, seed=1)
    fams = [f for f in discover(model).families if f.kind == "mlp" and 4 <= f.layer < 28]
    n_total = int(_budget(TARGETS["118.6M"]) * (134_515_008 - 49152 * 576)) // (3 * 576)  # MLP channels
    uniform = {f.key: n_total // len(fams) + (1 if i < n_total % len(fams) else 0) for i, f in enumerate(fams)}
    t0 = time.perf_counter()
    with torch.no_grad():
        cons = consumers(model, fams)
        stats = collect_input_stats(model, cons, examples, 8, gram=True)
        names = {f.key: next(m.param for m in f.members if m.dim == 1 and m.param in cons) for f in fams}
        params = dict(model.named_parameters())
        dense_w = {k: params[n].detach().clone() for k, n in names.items()}
        orders = {}
        for f in fams:
            cols = consumer_columns(f, names[f.key])
            orders[f.key], _, _ = obs_select(dense_w[f.key], stats[names[f.key]].gram, cols, 921)
        print(f"database: {time.perf_counter() - t0:.0f} s", flush=True)
        cache: dict[tuple[str, int], torch.Tensor] = {}

        def weight(key: str, c: int) -> torch.Tensor:
            if c == 0:
                return dense_w[key]
            if (key, c) not in cache:
                cols = consumer_columns(next(f for f in fams if f.key == key), names[key])
                cache[(key, c)] = refit_kept(dense_w[key], stats[names[key]].gram,
                                             cols[torch.as_tensor(orders[key][:c])].flatten()).float()
            return cache[(key, c)]

        x, call = capture(model, layers, held)
        dense_states = [x]
        for layer in layers:
            dense_states.append(call(layer, dense_states[-1]))
        dense = _logprobs(model, layers, held, dense_states[-1], call.as_tuple)
        first = min(f.layer for f in fams)

        def fitness(counts: dict[str, int]) -> float:
            for f in fams:
                params[names[f.key]].data = weight(f.key, counts[f.key])
            h = dense_states[first]
            for layer in list(layers)[first:]:
                h = call(layer, h)
            logp = _logprobs(model, layers, held, h, call.as_tuple)
            return float((dense.exp() * (dense - logp)).sum() / held.numel())

        starts = {"uniform": uniform}
        got = obs_counts(model, fams, {k: list(range(v)) for k, v in uniform.items()}, examples, "residual")
        starts["residual"] = {k: len(v) for k, v in got.items()}
        if args.start:
            starts["given"] = json.loads(Path(args.start).read_text())
        scored = {name: fitness(c) for name, c in starts.items()}
        for name, v in scored.items():
            print(f"fitness {name}: {v:.5f}  {[starts[name][f.key] for f in fams]}", flush=True)
        best_name = min(scored, key=scored.get)
        best, best_fit = dict(starts[best_name]), scored[best_name]
        rng = random.Random(0)
        keys = [f.key for f in fams]
        accepted = 0
        for t in range(args.proposals):
            a, b = rng.sample(keys, 2)
            step = min(args.step, best[a])
            if step == 0 or best[b] + step > 921:
                continue
            trial = dict(best)
            trial[a] -= step
            trial[b] += step
            v = fitness(trial)
            if v < best_fit:
                best, best_fit, accepted = trial, v, accepted + 1
            if t % 10 == 0:
                print(f"{t}: fitness {best_fit:.5f} ({accepted} accepted, {time.perf_counter() - t0:.0f} s)", flush=True)
        print("final", best_fit, [best[k] for k in keys], flush=True)
        Path(args.out).write_text(json.dumps({"start": best_name, "fitness": best_fit, "counts": best,
                                              "starts": scored}, indent=1))


if __name__ == "__main__":
    main()
