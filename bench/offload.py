"""Peak host memory and wall time of in-memory vs offloaded (layer-streamed) pruning of SmolLM2-135M in fp32.

    python bench/offload.py                          # converts ../shared's GGUF once to a temporary folder
    python bench/offload.py --smollm2 /tmp/smollm2_fp32   # reuse an fp32 safetensors folder

Each run is a fresh subprocess (its peak resident set, ``VmHWM`` with the pipeline's per-stage resets
undone by ``LLMPruner.stream.memory.process_peak_rss``, is its own) doing the whole job: load
(or open) the model, calibrate, score, select, shrink, save. Configurations: Taylor ``param_first`` on the
protocol's 10 x 64 calibration tokens, the forward-only setting wanda + 20 % parameter budget + refit on
48 x 64 C4 tokens (3,072: the fewest a refit of SmolLM2's 1,536-wide MLP inputs accepts), and the README's
recommended setting (OBS selection, residual allocation, refit; 128 x 128 C4 tokens; 118,589,760 parameters),
without and with ``--reconstruct_steps 200``, each in memory and with ``--offload``; plus the guarded
sequential refit (``--offload_sequential``) of the wanda setting. ``--settings`` runs a subset. An "empty"
run measures the baseline: a process that only imports torch, transformers and LLMPruner (and, printed too, the
same process once it has loaded the tokenizer, a fixed cost that every run pays). The saved weights
of each offloaded run are compared with its in-memory twin, tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED, table

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct-Q4_1"
PROTOCOL = SHARED / "data" / "smollm2_protocol.json"
SETTINGS = {
    "taylor": dict(pruner_type="taylor", taylor="param_first", pruning_ratio=0.25),
    "wanda+budget+refit": dict(pruner_type="wanda", param_budget=0.2, compensation="refit"),
    # the README's recommended setting at 118,589,760 parameters (MLP channels of layers 4..27)
    "obs+residual+refit": dict(pruner_type="l2", param_budget=0.14996, compensation="refit", selection="obs",
                               obs_allocation="residual", attention_layers=range(0), mlp_layers=range(4, 28)),
}
SETTINGS["obs+residual+refit+reconstruct"] = dict(SETTINGS["obs+residual+refit"], reconstruct_steps=200)
# calibration of each setting: the protocol's 10 x 64 ids, or (examples, tokens) of c4_demo.jsonl windows
CALIBRATION = {"taylor": "protocol", "wanda+budget+refit": (48, 64), "obs+residual+refit": (128, 128),
               "obs+residual+refit+reconstruct": (128, 128)}
GUARDED = {"wanda+budget+refit"}  # also run with --offload_sequential (OBS has no one-shot candidate to guard)


def peak_mb() -> float:
    """The process's peak RSS in MiB. Not ``VmHWM`` alone: the offloaded pipeline resets it per stage (for its
    log), so at the end it holds only the last stage's peak; ``process_peak_rss`` keeps the earlier ones."""
    from LLMPruner.stream.memory import process_peak_rss
    return process_peak_rss() / 2**20


def child(kind: str, setting: str, folder: str, out: str) -> dict:
    import torch
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (the baseline imports what every run imports)
    import LLMPruner
    from LLMPruner.stream import pipeline  # noqa: F401
    if kind == "empty":
        return {"peak_mb": peak_mb(), "seconds": 0.0}
    if kind == "empty+tokenizer":  # what every run also holds, whatever the model's size
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(folder)
        return {"peak_mb": peak_mb(), "seconds": 0.0}
    t0 = time.perf_counter()
    examples = calibration(setting, folder)
    kw = dict(SETTINGS[setting])
    if kw.get("param_budget") is None and "mlp_layers" not in kw:
        kw.update(attention_layers=range(3, 29), mlp_layers=range(3, 29))
    if kind == "memory":
        model, tokenizer = LLMPruner.load_model(folder, dtype=torch.float32)
        LLMPruner.prune(model, examples=examples, **kw)
        LLMPruner.save_pruned(model, tokenizer, out)
    else:
        from transformers import AutoTokenizer
        pipeline.prune_offloaded(folder, save_to=out, tokenizer=AutoTokenizer.from_pretrained(folder),
                                 examples=examples, sequential=kind == "offload-sequential", **kw)
    return {"peak_mb": peak_mb(), "seconds": time.perf_counter() - t0}


def calibration(setting: str, folder: str):
    import torch
    if CALIBRATION[setting] == "protocol":
        return torch.tensor(json.loads(PROTOCOL.read_text())["calib"])
    from transformers import AutoTokenizer
    from LLMPruner.data.calibration import calibration_examples
    n, t = CALIBRATION[setting]
    return calibration_examples(str(SHARED / "data" / "c4" / "c4_demo.jsonl"), AutoTokenizer.from_pretrained(folder),
                                n, t, 0)


def run_child(kind: str, setting: str, folder: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--setting", setting, "--smollm2", str(folder),
                           "--out", str(out)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{kind}/{setting} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_diff(a: Path, b: Path) -> float:
    """Largest absolute difference of same-named tensors of two saved folders (one tensor at a time)."""
    import torch
    from safetensors import safe_open
    def index(folder):
        return {k: f for f in folder.glob("model*.safetensors") for k in safe_open(str(f), "pt").keys()}
    ia, ib = index(a), index(b)
    assert set(ia) == set(ib), set(ia) ^ set(ib)
    worst = 0.0
    for k in ia:
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            assert x.shape == y.shape, k
            worst = max(worst, (x - y).abs().max().item())
    return worst


def convert(tmp: Path) -> Path:
    import torch
    sys.path.insert(0, str(REPO))
    import LLMPruner
    model, tokenizer = LLMPruner.load_model(GGUF, dtype=torch.float32)
    folder = tmp / "smollm2_fp32"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2", default=None, help="an fp32 SmolLM2 safetensors folder (default: convert the GGUF)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated settings to run (default: all of {', '.join(SETTINGS)})")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default="taylor", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(args.child, args.setting, args.smollm2, args.out)))
        return
    if not PROTOCOL.exists() or (args.smollm2 is None and not GGUF.exists()):
        sys.exit(f"this benchmark needs {PROTOCOL} and {GGUF} (../shared), or --smollm2 FOLDER")
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as tmp:
        tmp = Path(tmp)
        folder = Path(args.smollm2) if args.smollm2 else convert(tmp)
        config = json.loads((folder / "config.json").read_text())
        weights = sum(f.stat().st_size for f in folder.glob("model*.safetensors")) / 2**20
        n, t = 10, 64
        states = (config["num_hidden_layers"] + 1) * n * t * config["hidden_size"] * 4 / 2**20
        empty = run_child("empty", "taylor", folder, tmp / "empty")["peak_mb"]
        with_tokenizer = run_child("empty+tokenizer", "taylor", folder, tmp / "empty")["peak_mb"]
        rows = []
        chosen = [x for x in args.settings.split(",") if x]
        unknown = sorted(set(chosen) - set(SETTINGS))
        if unknown:
            sys.exit(f"--settings {','.join(unknown)}: choose among {', '.join(SETTINGS)}")
        for setting in chosen:
            kinds = ["memory", "offload"] + (["offload-sequential"] if setting in GUARDED else [])
            res = {k: run_child(k, setting, folder, tmp / f"{setting}-{k}") for k in kinds}
            for k in kinds:
                r = res[k]
                extra = r["peak_mb"] - empty
                rows.append({"setting": setting, "run": k, "peak RSS MiB": r["peak_mb"], "minus empty MiB": extra,
                             "x weights": extra / weights, "wall s": r["seconds"],
                             "wall / in-memory": r["seconds"] / res["memory"]["seconds"],
                             "max |diff| vs in-memory": "-" if k == "memory" else
                             f"{max_diff(tmp / f'{setting}-memory', tmp / f'{setting}-{k}'):.2e}"
                             + (" (other weights by design)" if k == "offload-sequential" else "")})
    print(f"SmolLM2-135M fp32: weights {weights:.0f} MiB; boundary states (31 x 10 x 64 x 576 fp32) {states:.1f} MiB; "
          f"empty process (torch + transformers + LLMPruner imported) {empty:.0f} MiB peak RSS, "
          f"{with_tokenizer:.0f} MiB once it has also loaded the tokenizer (which every run holds)")
    print(f"goal: offloaded Taylor peak - empty <= 0.35 x weights + states = {0.35 * weights + states:.0f} MiB, "
          "wall <= 2 x in-memory")
    print(table(rows, ["setting", "run", "peak RSS MiB", "minus empty MiB", "x weights", "wall s", "wall / in-memory",
                       "max |diff| vs in-memory"]))


if __name__ == "__main__":
    main()
