"""SmolLM2-135M-Instruct (GQA: 9 query heads, 3 KV groups, 30 layers): the paper's estimators with the
reference's flags vs the project's best retraining-free settings at equal parameter counts.

    python bench/smollm2.py [--smollm2 FOLDER] [--windows 160] [--rows name,name,...] [--json out.json]

The model is ``../shared/models/SmolLM2-135M-Instruct-Q4_1`` (GGUF, dequantised once into a temporary
safetensors folder) unless ``--smollm2`` names an fp32 folder. Calibration and evaluation use the fixed
ids of ``../shared/data/smollm2_protocol.json``: the paper rows calibrate on its 10 x 64 ``calib`` ids;
the project's rows on 128 x 128 tokens of ``../shared/data/c4/c4_demo.jsonl`` (seeded windows). The
``obs`` rows: ``--selection obs`` (structured OBS in the sequential pass, ``LLMPruner/select/obs.py``), the l2
scores only giving the uniform per-layer counts that ``residual`` allocation may redistribute
(``LLMPruner/select/allocation.py``); ``+ reconstruct N``: N Adam steps on each pruned layer's MLP toward the
dense MLP on the pruned inputs (``LLMPruner/compensate/reconstruct.py``; gradient steps, not closed form). PPL =
exp(mean next-token CE over the ``--windows`` first 128-token windows of WikiText-2 / PTB, batches of 4).
Each row runs in a fresh process (peak RSS is that process's), pruning timed alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import SHARED, table

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct-Q4_1"
PROTOCOL = SHARED / "data" / "smollm2_protocol.json"
C4 = SHARED / "data" / "c4" / "c4_demo.jsonl"
REF = dict(attention_layers=range(4, 28), mlp_layers=range(4, 28))  # --block_*_layer_start 4 --end 28
DENSE = 134_515_008
TARGETS = {"118.6M": 118_589_760, "95.6M": 95_586_624, "107.6M": int(0.8 * DENSE)}


def _budget(target: int) -> float:
    """--param_budget (fraction of the non-embedding parameters) that removes DENSE - target (what
    ``--target_params`` computes from the model)."""
    from LLMPruner.select.budget import budget_for_target
    return budget_for_target(DENSE, DENSE - 49152 * 576, target)


# name -> (prune() kwargs, calibration: "paper" 10 x 64 protocol ids | "c4" 128 x 128)
ROWS: dict[str, tuple[dict, str]] = {
    "dense": ({}, "none"),
    "random 0.25 (paper)": (dict(pruner_type="random", pruning_ratio=0.25, **REF), "paper"),
    "l2 0.25 (paper)": (dict(pruner_type="l2", pruning_ratio=0.25, **REF), "paper"),
    "taylor param_first 0.25 (paper)": (dict(pruner_type="taylor", pruning_ratio=0.25, **REF), "paper"),
    "taylor param_mix 0.25 (paper)": (dict(pruner_type="taylor", taylor="param_mix", pruning_ratio=0.25, **REF),
                                      "paper"),
    "random 0.5 (paper)": (dict(pruner_type="random", pruning_ratio=0.5, **REF), "paper"),
    "taylor param_first 0.5 (paper)": (dict(pruner_type="taylor", pruning_ratio=0.5, **REF), "paper"),
}


def _project_rows() -> None:
    mlp_only = dict(attention_layers=range(0), mlp_layers=range(4, 28))
    for label, target in TARGETS.items():
        b = _budget(target)
        ROWS[f"{label} taylor MLP-only uniform"] = (dict(pruner_type="taylor", param_budget=b, **mlp_only), "c4")
        if label != "107.6M":
            ROWS[f"{label} taylor MLP-only uniform + refit"] = (
                dict(pruner_type="taylor", param_budget=b, compensation="refit", **mlp_only), "c4")
        ROWS[f"{label} wanda MLP-only uniform"] = (dict(pruner_type="wanda", param_budget=b, **mlp_only), "c4")
        obs = dict(pruner_type="l2", param_budget=b, compensation="refit", selection="obs", **mlp_only)
        ROWS[f"{label} obs MLP-only uniform + refit"] = (obs, "c4")
        ROWS[f"{label} obs MLP-only residual-allocated + refit"] = (dict(obs, obs_allocation="residual"), "c4")
        ROWS[f"{label} obs MLP-only residual-allocated (cap 80 %) + refit"] = (
            dict(obs, obs_allocation="residual", obs_max_fraction=0.8), "c4")
        if label != "95.6M":  # + local MLP reconstruction by gradient steps (not closed form: reported apart)
            ROWS[f"{label} obs MLP-only residual-allocated + refit + reconstruct 200"] = (
                dict(obs, obs_allocation="residual", reconstruct_steps=200), "c4")
        for cap in (40, 50, 70):
            ROWS[f"{label} obs MLP-only residual-allocated (cap {cap} %) + refit"] = (
                dict(obs, obs_allocation="residual", obs_max_fraction=cap / 100), "c4")


_project_rows()


def run_one(name: str, model_dir: str, windows: int) -> dict:
    torch.set_num_threads(1)
    from LLMPruner.checkpoint import load_model
    from LLMPruner.data.calibration import calibration_examples
    from LLMPruner.prune import prune
    from LLMPruner.shrink import count_parameters
    kwargs, calib = ROWS[name]
    proto = json.loads(PROTOCOL.read_text())
    model, tokenizer = load_model(model_dir, device="cpu", dtype=torch.float32)
    model.eval()
    examples = None
    if calib == "paper":
        examples = torch.tensor(proto["calib"])
    elif calib == "c4":
        examples = calibration_examples(str(C4), tokenizer, 128, 128, seed=0)
    t0 = time.perf_counter()
    if kwargs:
        prune(model, examples=examples, seed=42, **kwargs)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.eval()
    out = {"name": name, "params": count_parameters(model), "prune s": round(seconds, 1),
           "peak RSS MB": round(rss), "calibration": {"paper": "10x64", "c4": "128x128 C4"}.get(calib, "")}
    for ds in ("wikitext2", "ptb"):
        ids = torch.tensor(proto[ds][:windows])
        out[ds] = round(_ppl(model, ids), 2)
    return out


@torch.no_grad()
def _ppls(model, windows: torch.Tensor, taus: tuple[float, ...] = (1.0,), batch: int = 4) -> list[float]:
    """Perplexity of ``windows`` with the logits divided by each of ``taus`` (one forward per batch)."""
    nll, count = [0.0] * len(taus), 0
    for s in range(0, len(windows), batch):
        ids = windows[s:s + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        logits, y = logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        for i, tau in enumerate(taus):
            nll[i] += torch.nn.functional.cross_entropy(logits if tau == 1 else logits / tau, y,
                                                        reduction="sum").item()
        count += y.numel()
    return [math.exp(v / count) for v in nll]


def _ppl(model, windows: torch.Tensor, batch: int = 4) -> float:
    return _ppls(model, windows, batch=batch)[0]


def _fp32_folder(tmp: Path) -> str:
    from LLMPruner.checkpoint import load_model
    model, tok = load_model(str(GGUF), device="cpu", dtype=torch.float32)
    model.save_pretrained(tmp / "smollm2")
    tok.save_pretrained(tmp / "smollm2")
    return str(tmp / "smollm2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2", default=None, help="an fp32 SmolLM2-135M folder (default: dequantise the GGUF)")
    p.add_argument("--windows", type=int, default=160, help="evaluation windows per dataset (of 160)")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--json", default=None, help="append each row's result to this JSON-lines file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child: the library's per-layer INFO reports go to stderr, which the parent passes on
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
        print("RESULT " + json.dumps(run_one(args.one, args.smollm2, args.windows)), flush=True)
        return
    if not PROTOCOL.exists() or (args.smollm2 is None and not GGUF.exists()):
        sys.exit(f"this benchmark needs {PROTOCOL} and {GGUF} (../shared), which are absent")
    if args.smollm2 is not None and not (Path(args.smollm2) / "config.json").is_file():
        sys.exit(f"--smollm2 {args.smollm2!r}: not a model folder (no config.json); give an fp32 SmolLM2 "
                 f"safetensors folder, or leave the flag out to dequantise the GGUF")
    names = [n for n in args.rows.split(",") if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.smollm2 or _fp32_folder(Path(tmp))
        rows = []
        for name in names:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--smollm2", folder,
                                   "--windows", str(args.windows)], stdout=subprocess.PIPE, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(f"{name}: failed (exit status {proc.returncode}; its log is above)", file=sys.stderr)
                continue
            row = json.loads(line[0][7:])
            row["removed"] = f"{100 * (1 - row['params'] / DENSE):.2f} %"
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows, ["name", "params", "removed", "wikitext2", "ptb", "calibration", "prune s", "peak RSS MB"]))


if __name__ == "__main__":
    main()
