"""The refit's and OBS's float64 linear algebra on one layer, per ``--linalg_device`` (a benchmark).

    python bench/linalg_device.py [--shape 4096x11008] [--remove 1000] [--tokens 16384] [--devices cpu,cuda]
                                  [--smollm2 /tmp/smollm2_fp32]

One consumer of ``out x in`` (default LLaMA-7B's ``down_proj``, 4,096 x 11,008) with a seeded Gram of
``--tokens`` calibration tokens: the damped inverse, ``--remove`` greedy OBS removals (``obs_select``,
its own inverse included) and the sequential refit of the kept columns (``refit_layer``: ridge grid on
held-out tokens, then the final solve), timed on each device, with the largest difference of the
refitted columns from the host's. ``--smollm2`` also prunes SmolLM2 with the README's recommended setting
on CUDA twice, the linear algebra on the host and on the GPU, and compares time and weights (the check to
run when a GPU is lent). Devices this machine lacks are skipped, saying so. One thread on the host
(``torch.set_num_threads(1)``), as every benchmark here: a user's many-core host is faster, a GPU more so.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def one_layer(out: int, width: int, remove: int, tokens: int, device: torch.device) -> dict:
    from LLMPruner.compensate.refit import CrossStats, refit_layer
    from LLMPruner.select.obs import damped_inverse, obs_select
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(width, generator=g) + 0.05
    mix = torch.randn(64, width, generator=g)  # a shared low-rank part: removed inputs are partly predictable
    w = (torch.randn(out, width, generator=g) * 0.02).double().to(device)
    fit, check = CrossStats.empty(width, dense=False, device=device), CrossStats.empty(width, dense=False, device=device)
    for s in range(0, tokens, 2048):  # seeded token chunks, alternately fitted and judged
        n = min(2048, tokens - s)
        x = ((torch.randn(n, width, generator=g) + torch.randn(n, 64, generator=g) @ mix) * scale).to(device)
        fit.add(None, x[0::2])
        check.add(None, x[1::2])
    gram = fit.gram + check.gram
    row = {"device": str(device)}
    row["damped inverse s"], _ = _timed(device, lambda: damped_inverse(gram))
    row[f"OBS {remove} removals s"], (removed, _, _) = _timed(
        device, lambda: obs_select(w, gram, torch.arange(width)[:, None], remove))
    kept = torch.tensor(sorted(set(range(width)) - set(removed)), device=device)
    row["refit s"], (cols, report) = _timed(device, lambda: refit_layer(w, fit, kept, check=check))
    row["refit"] = report.split(" lowers")[0]
    row["_cols"], row["_removed"] = cols.cpu(), removed
    return row


def smollm2(path: str, device: torch.device) -> list[dict]:
    """The recommended SmolLM2 setting on ``device``, the linear algebra on the host and then on ``device``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import C4, TARGETS, _budget
    from LLMPruner.checkpoint import load_model
    from LLMPruner.data.calibration import calibration_examples
    from LLMPruner.prune import prune
    base, tok = load_model(path, device="cpu", dtype=torch.float32)
    examples = calibration_examples(str(C4), tok, 128, 128, seed=0)
    rows, states = [], []
    for linalg in ("cpu", str(device)):
        model = load_model(path, device=str(device), dtype=torch.float32)[0].eval()
        secs, _ = _timed(device, lambda: prune(
            model, pruner_type="l2", param_budget=_budget(TARGETS["118.6M"]), attention_layers=range(0),
            mlp_layers=range(4, 28), compensation="refit", selection="obs", obs_allocation="residual",
            examples=examples, seed=42, linalg_device=linalg))
        states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
        rows.append({"SmolLM2 recommended, model on": str(device), "linalg": linalg, "prune s": round(secs, 1)})
    rows[-1]["max |weight diff| vs host linalg"] = max(float((states[0][k] - states[1][k]).abs().max())
                                                       for k in states[0])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x11008", help="OUTxIN of the consumer (LLaMA-7B down_proj)")
    p.add_argument("--remove", type=int, default=1000, help="greedy OBS removals")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (128 x 128)")
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--smollm2", default=None, help="also prune SmolLM2 (fp32 folder) on CUDA, linalg host vs GPU")
    args = p.parse_args()
    torch.set_num_threads(1)
    out, width = (int(v) for v in args.shape.lower().split("x"))
    rows, host = [], None
    for name in args.devices.split(","):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"{name}: skipped (no CUDA on this machine)")
            continue
        row = one_layer(out, width, args.remove, args.tokens, device)
        if host is None:
            host = row
        row["max |col diff| vs first"] = float((row["_cols"] - host["_cols"]).abs().max()) \
            if row["_removed"] == host["_removed"] else "different removals"
        rows.append(row)
    keys = [k for k in rows[0] if not k.startswith("_")] if rows else []
    print(f"\none consumer {out} x {width}, {args.tokens} tokens, {args.remove} removals; host threads 1")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.1f}" if isinstance(row[k], float) and k.endswith(" s") else str(row[k])
                                for k in keys) + " |")
    if args.smollm2:
        if not torch.cuda.is_available():
            print("--smollm2: skipped (no CUDA on this machine)")
            return
        for row in smollm2(args.smollm2, torch.device("cuda")):
            print(row)


if __name__ == "__main__":
    main()
