"""One-shot vs sequential compensation under --offload, on stories260K: calibration loss of the saved model.

    python bench/offload_sequential.py

16 x 64 TinyStories calibration tokens; 50 % / 25 % of the MLP channels of every layer and of the heads
of layers 1-3. One-shot (``refit_oneshot``, ``bias``): every layer's statistics from the dense model (the
in-memory decisions). ``refit``: the in-memory sequential refit (layer i refit on the outputs of the
already pruned and refit layers 0..i-1, held-out ridge choice and fallback). ``sequential=True``
(``--offload_sequential``): the same pass builds the one-shot and the sequential candidate and keeps the
one with the lower calibration loss (which one is printed: S sequential, O one-shot). Also the wall time
of each kind of run, summed over the table's rows.

    python bench/offload_sequential.py --smollm2 /tmp/smollm2_fp32

    python bench/offload_sequential.py --heldout

Whether the calibration-loss choice carries over to unseen text: the same settings with calibration
from the first 20 % of TinyStories and perplexity on the first 65,536 tokens of the rest (128-token
windows), for the refit and bias columns.

The guard's cost on SmolLM2-135M fp32 (a safetensors folder): wanda + 20 % parameter budget + refit on
48 x 64 C4 tokens (3,072: the fewest a refit of the 1,536-wide MLP inputs accepts), in memory, under
--offload, and under --offload --offload_sequential; each run a fresh process (peak RSS = its whole-process VmHWM,
``process_peak_rss``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, SHARED, STORIES, TINYSTORIES, require_shared, table

from LLMPruner import load_model, load_pruned
from LLMPruner.data.calibration import calibration_examples
from LLMPruner.stream.pipeline import prune_offloaded

RUNS = {"none": dict(compensation="none"), "refit_oneshot": dict(compensation="refit_oneshot"),
        "refit": dict(compensation="refit"), "refit --offload_sequential": dict(compensation="refit", sequential=True),
        "bias": dict(compensation="bias"), "bias --offload_sequential": dict(compensation="bias", sequential=True)}
CHOICE = re.compile(r"calibration loss ([\d.]+) sequential, ([\d.]+) one-shot: keeping the (\S+) model")


class Choices(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.found: list[tuple[float, float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = CHOICE.search(record.getMessage())
        if m:
            self.found.append((float(m[1]), float(m[2]), m[3]))


def loss_after(examples, heldout: torch.Tensor | None = None, **kw):
    """Calibration loss of the saved model (and its held-out perplexity when ``heldout`` is given)."""
    with tempfile.TemporaryDirectory() as d:
        prune_offloaded(STORIES, save_to=d, examples=examples, attention_layers=range(1, 4),
                        mlp_layers=range(0, 5), **kw)
        model, _ = load_pruned(d)
        with torch.no_grad():
            loss = model(examples, labels=examples).loss.item()
        if heldout is None:
            return loss
        from LLMPruner.evaluate.ppl import perplexity
        return loss, perplexity(model, heldout, 128, batch_size=16)


def heldout_table(choices: "Choices") -> None:
    from common import split_stories
    with tempfile.TemporaryDirectory() as tmp:
        calib, held = split_stories(Path(tmp))
        _, tokenizer = load_model(STORIES)
        examples = calibration_examples(str(calib), tokenizer, 16, 64, 0)
        ids = tokenizer(held.read_text(), return_tensors="pt").input_ids[0][:65536]
    names = [n for n in RUNS if n != "none"]
    rows = []
    for pruner_type in ("taylor", "l2", "wanda", "fluctuation"):
        for ratio in (0.5, 0.25):
            row = {"scores": pruner_type, "ratio": ratio}
            for name in names:
                loss, ppl = loss_after(examples, ids, pruner_type=pruner_type, pruning_ratio=ratio, **RUNS[name])
                kept = f" ({choices.found.pop()[2][0].upper()})" if RUNS[name].get("sequential") else ""
                row[name] = f"{loss:.3f} / {ppl:.2f}{kept}"
            rows.append(row)
    print("calibration loss / held-out PPL (stories260K; 16 x 64 calibration tokens from the first 20 % of "
          "TinyStories, PPL on 65,536 tokens of the rest); (S)/(O): the guard kept sequential / one-shot")
    print(table(rows, ["scores", "ratio"] + names))


SMOLLM2 = dict(pruner_type="wanda", param_budget=0.2, compensation="refit")


def smollm2_child(kind: str, folder: str, out: str) -> dict:
    sys.path.insert(0, str(REPO))
    from offload import peak_mb
    from transformers import AutoTokenizer
    import LLMPruner
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("LLMPruner.compensate.sequential").setLevel(logging.INFO)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = calibration_examples(str(SHARED / "data" / "c4" / "c4_demo.jsonl"), tokenizer, 48, 64, 0)
    t0 = time.perf_counter()
    if kind == "memory":
        model, tokenizer = LLMPruner.load_model(folder, dtype=torch.float32)
        LLMPruner.prune(model, examples=examples, **SMOLLM2)
        LLMPruner.save_pruned(model, tokenizer, out)
    else:
        prune_offloaded(folder, save_to=out, tokenizer=tokenizer, examples=examples,
                        sequential=kind == "offload --offload_sequential", **SMOLLM2)
    return {"peak_mb": peak_mb(), "seconds": time.perf_counter() - t0}


def smollm2(folder: Path) -> None:
    from offload import max_diff
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp:
        res = {}
        for kind in ("memory", "offload", "offload --offload_sequential"):
            out = Path(tmp) / kind.replace(" ", "_")
            proc = subprocess.run([sys.executable, __file__, "--smollm2", str(folder), "--child", kind, "--out",
                                   str(out)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            res[kind] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            choice = CHOICE.search(proc.stderr)
            rows.append({"run": kind, "peak RSS MiB": r["peak_mb"], "wall s": r["seconds"],
                         "wall / in-memory": r["seconds"] / res["memory"]["seconds"],
                         "max |diff| vs in-memory": "-" if kind == "memory" else
                         f"{max_diff(Path(tmp) / 'memory', out):.2e}",
                         "guard": "" if choice is None else
                         f"sequential {choice[1]}, one-shot {choice[2]}: kept {choice[3]}"})
    print("SmolLM2-135M fp32, wanda + 20 % budget + refit, 48 x 64 C4 calibration tokens")
    print(table(rows, ["run", "peak RSS MiB", "wall s", "wall / in-memory", "max |diff| vs in-memory", "guard"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2", default=None, help="an fp32 SmolLM2 safetensors folder: the guard's cost there")
    p.add_argument("--heldout", action="store_true", help="calibration loss and held-out PPL of each choice")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(smollm2_child(args.child, args.smollm2, args.out)))
        return
    if args.smollm2:
        smollm2(Path(args.smollm2))
        return
    require_shared()
    torch.set_num_threads(1)
    choices = Choices()
    seq_logger = logging.getLogger("LLMPruner.compensate.sequential")
    seq_logger.setLevel(logging.INFO)
    seq_logger.addHandler(choices)
    if args.heldout:
        heldout_table(choices)
        return
    _, tokenizer = load_model(STORIES)
    examples = calibration_examples(str(TINYSTORIES), tokenizer, 16, 64, 0)
    rows, seconds = [], {name: 0.0 for name in RUNS}
    for pruner_type in ("taylor", "l2", "wanda", "fluctuation"):
        for ratio in (0.5, 0.25):
            row = {"scores": pruner_type, "ratio": ratio}
            for name, kw in RUNS.items():
                t0 = time.perf_counter()
                loss = loss_after(examples, pruner_type=pruner_type, pruning_ratio=ratio, **kw)
                seconds[name] += time.perf_counter() - t0
                row[name] = f"{loss:.3f}"
                if kw.get("sequential"):
                    seq, one, kept = choices.found.pop()
                    row[name] += f" ({kept[0].upper()})"
                    row[f"{name} candidate"] = seq
                    assert loss <= one + 1e-4, (pruner_type, ratio, name, loss, one)
            rows.append(row)
    print("calibration loss of the saved model (stories260K, 16 x 64 tokens); (S)/(O): the guard kept the "
          "sequential / one-shot candidate; 'candidate': the sequential candidate's loss")
    print(table(rows, ["scores", "ratio", "none", "refit_oneshot", "refit", "refit --offload_sequential", "bias",
                       "bias --offload_sequential", "bias --offload_sequential candidate"]))
    print("\nwall time, all rows: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
