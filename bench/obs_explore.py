"""Exploration of structured-OBS selection on SmolLM2 (few windows): one process, model loaded once.

    python bench/obs_explore.py --windows 40 --out /tmp/obs_explore.jsonl [--save DIR] VARIANT [VARIANT ...]

A VARIANT is ``name:key=value,key=value`` of ``prune()`` keyword arguments on top of the 118.6M
MLP-only uniform setting (layers 4..27, 128 x 128 C4 tokens), e.g. ``obs:selection=obs,pruner_type=l2``;
``target=95.6M`` / ``107.6M`` changes the parameter count; ``drop=L`` removes decoder layer L first and
prunes the MLPs to the same total parameter count; ``ridges=1e-6/1e-5/...`` replaces the refit's ridge
grid (``compensate.RIDGES``); ``calib_seed=S`` draws the calibration windows with seed S (the
``c4_heldout`` split is defined for seed 0 only: it may overlap other seeds' windows); ``counts=FILE``
(a JSON ``{family: count}``, or bench/alloc_search.py's output) gives the sequential OBS pass its per-layer counts. The variant ``dense``
prunes nothing. ``--heldout`` adds two splits no setting was chosen on: 128 windows of 128 tokens from the C4
documents outside the calibration windows (``c4_heldout``) and the first 128 of PTB's validation text
(``ptb_valid``), for choosing a setting without looking at the reported WikiText-2 / PTB test windows.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import C4, PROTOCOL, TARGETS, _budget, _ppl  # noqa: E402

PTB_VALID = PROTOCOL.parent / "ptb" / "ptb.valid.txt"


def heldout_sets(tok, n: int = 128, seq: int = 128) -> dict[str, torch.Tensor]:
    """``c4_heldout`` (C4 documents the 128 x 128 calibration windows did not come from) and ``ptb_valid``."""
    from LLMPruner.data.calibration import calibration_windows, heldout_windows, load_calibration_text
    docs = load_calibration_text(str(C4))
    _, used = calibration_windows(docs, tok, 128, 128, seed=0)
    ids = tok(PTB_VALID.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    ptb = ids[:ids.numel() // seq * seq].reshape(-1, seq)[:n]
    return {"c4_heldout": heldout_windows(docs, tok, used, n, seq), "ptb_valid": ptb}


def parse(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        kw[k] = v
    return name, kw


def prune_variant(base, tok, spec: str):
    """A pruned copy of ``base`` for one VARIANT: (name, model, prune seconds, target label)."""
    from LLMPruner.compensate.refit import refit
    from LLMPruner.select.budget import budget_for_target, non_embedding_parameters
    from LLMPruner.data.calibration import calibration_examples
    from LLMPruner.select.allocation import obs_counts
    from LLMPruner.plan import PruningPlan
    from LLMPruner.prune import prune
    from LLMPruner.shrink import apply_plan, count_parameters
    name, kw = parse(spec)
    n_ex = kw.pop("num_examples", 128)
    seq = kw.pop("seq_len", 128)
    target = kw.pop("target", "118.6M")
    first, last = (int(v) for v in str(kw.pop("layers", "4-28")).split("-"))
    counts_file = kw.pop("counts", None)  # per-family counts for the sequential OBS pass (a JSON file)
    drop = kw.pop("drop", None)           # a decoder layer removed first (its parameters count in the budget)
    ridges = kw.pop("ridges", None)       # the refit's ridge grid, e.g. 1e-6/1e-5/1e-4/1e-3/1e-2/1e-1/1
    calib_seed = kw.pop("calib_seed", 0)  # which C4 windows calibrate (c4_heldout assumes 0)
    prune_module = sys.modules["LLMPruner.prune"]  # (the package's ``prune`` attribute is the function)
    prune_module.obs_counts = obs_counts
    if counts_file:
        given = json.loads(Path(counts_file).read_text())
        given = given.get("counts", given)
        prune_module.obs_counts = lambda *a, **k: {key: list(range(n)) for key, n in given.items()}
    examples = calibration_examples(str(C4), tok, n_ex, seq, seed=calib_seed)
    model = copy.deepcopy(base)
    budget = _budget(TARGETS[target])
    if drop is not None:
        n = len(model.model.layers)
        apply_plan(model, PruningPlan(keep_layers=[i for i in range(n) if i != drop]))
        last -= int(first <= drop < last)
        budget = budget_for_target(count_parameters(model), non_embedding_parameters(model), TARGETS[target])
    full = dict(pruner_type="taylor", param_budget=budget, attention_layers=range(0),
                mlp_layers=range(first, last), compensation="refit")
    full.update(kw)
    grid = compensate.RIDGES
    if ridges is not None:
        compensate.RIDGES = tuple(float(r) for r in str(ridges).split("/"))
    t0 = time.perf_counter()
    try:
        if name != "dense":
            prune(model, examples=examples, seed=42, **full)
    finally:
        compensate.RIDGES = grid
    return name, model.eval(), time.perf_counter() - t0, target


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="+")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--model", default="/tmp/smollm2_fp32")
    p.add_argument("--out", default="/tmp/obs_explore.jsonl")
    p.add_argument("--ptb", action="store_true")
    p.add_argument("--heldout", action="store_true", help="also C4 held-out and PTB valid perplexity")
    p.add_argument("--save", default=None, help="save each pruned model to SAVE/<variant name>")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("LLMPruner.select.allocation", "LLMPruner.compensate.sequential",
                 "LLMPruner.compensate.reconstruct"):
        logging.getLogger(name).setLevel(logging.INFO)
    from LLMPruner.checkpoint import load_model, save_pruned
    from LLMPruner.shrink import count_parameters
    proto = json.loads(PROTOCOL.read_text())
    base, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    base.eval()
    held = heldout_sets(tok) if args.heldout else {}
    for spec in args.variants:
        name, model, secs, target = prune_variant(base, tok, spec)
        row = {"name": name, "spec": spec, "target": target, "params": count_parameters(model),
               "prune s": round(secs, 1), "rss MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "wikitext2": round(_ppl(model, torch.tensor(proto["wikitext2"][:args.windows])), 2),
               "windows": args.windows}
        if args.ptb:
            row["ptb"] = round(_ppl(model, torch.tensor(proto["ptb"][:args.windows])), 2)
        for key, ids in held.items():
            row[key] = round(_ppl(model, ids), 2)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        if args.save:
            save_pruned(model, tok, Path(args.save) / name)
        del model


if __name__ == "__main__":
    main()
