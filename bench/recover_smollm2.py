"""Recovery of SmolLM2-135M pruned by 20 %: LoRA + CE vs LoRA + KD vs full + KD at equal tokens (CPU).

    python bench/recover_smollm2.py [--smollm2 /tmp/smollm2_fp32] [--steps 24] [--eval_windows 160] \
        [--prune_flags "..."] [--work DIR]

1. prune SmolLM2 with hf_prune.py (``--prune_flags``; default Taylor param_first, block-wise layers 4..27,
   ``--param_budget 0.2``, calibration from ../shared/data/c4) unless WORK/pruned exists;
2. WikiText-2 / PTB perplexity on the fixed ids of ../shared/data/smollm2_protocol.json (dense, pruned);
3. each recovery run is one ``post_training.py`` process on the same packed ``c4_demo.jsonl`` blocks
   (``--steps`` x ``--batch`` blocks of ``--cutoff`` tokens), the teacher being the dense model;
   (the number of blocks c4_demo.jsonl packs into, and the epochs that makes, are printed and reported);
4. perplexity of every recovered checkpoint, training tokens/s, and the ratios to LoRA + CE's.
A run may carry its own learning rate and temperature: ``--runs "LoRA + CE@lr=5e-3,LoRA + KD@lr=1e-2@T=2"``
(a name may repeat with different settings: a learning-rate probe is one invocation); ``--eval_sets ptb
--eval_windows 48`` judges a probe on PTB so that WikiText-2, the reported metric, is not used to tune.
``--throughput_only --repeat N`` instead alternates the runs N times (no perplexity) and reports each run's
median tokens/s, its spread, and the KD/CE ratio of the medians and per round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, table  # noqa: E402

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct-Q4_1"
C4 = SHARED / "data" / "c4" / "c4_demo.jsonl"
PROTOCOL = SHARED / "data" / "smollm2_protocol.json"
PRUNE_FLAGS = ("--pruner_type taylor --taylor param_first --block_wise --block_attention_layer_start 4 "
               "--block_attention_layer_end 27 --block_mlp_layer_start 4 --block_mlp_layer_end 27 "
               "--param_budget 0.2 --num_examples 10 --calibration_seq_len 64")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RUNS = {  # name -> post_training flags (the learning rates are arguments)
    "LoRA + CE": ["--distill_loss", "none", "--train_mode", "lora"],
    "LoRA + KD": ["--distill_loss", "kl", "--train_mode", "lora"],
    "full + KD": ["--distill_loss", "kl", "--train_mode", "full"],
}


EVAL_WINDOWS = 160
EVAL_SETS = ("wikitext2", "ptb")
SETTINGS = {"lr": float, "T": float}  # what a --runs entry may set after "@"


def parse_runs(spec: str) -> list[tuple[str, dict[str, float]]]:
    """``"LoRA + CE@lr=5e-3,LoRA + KD@T=2"`` -> [(name, {"lr": 5e-3}), (name, {"T": 2.0})]."""
    runs = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, *sets = entry.split("@")
        name = name.strip()
        if name not in RUNS:
            sys.exit(f"--runs: unknown run {name!r}; allowed: {', '.join(RUNS)}")
        settings = {}
        for item in sets:
            key, _, value = item.partition("=")
            if key.strip() not in SETTINGS:
                sys.exit(f"--runs: unknown setting {item!r} in {entry!r}; allowed: lr=FLOAT, T=FLOAT")
            settings[key.strip()] = SETTINGS[key.strip()](value)
        if "T" in settings and "KD" not in name:
            sys.exit(f"--runs: T= in {entry!r}, but a temperature is for the KD runs only")
        runs.append((name, settings))
    return runs


def run_label(name: str, settings: dict[str, float]) -> str:
    return name + "".join(f"@{k}={v:g}" for k, v in settings.items())


def protocol_ppl(folder: str) -> dict[str, float]:
    from LLMPruner.checkpoint import load_model
    from LLMPruner.evaluate.ppl import perplexity
    model, _ = load_model(folder, dtype=torch.float32)
    ids = json.loads(PROTOCOL.read_text())
    with torch.no_grad():
        return {name: perplexity(model.eval(), torch.tensor(ids[name][:EVAL_WINDOWS]).flatten(), 128, batch_size=4)
                for name in EVAL_SETS}


def prune(base: str, folder: Path, flags: str) -> None:
    subprocess.run([sys.executable, "hf_prune.py", "--base_model", base, "--device", "cpu", "--eval_device", "cpu",
                    *flags.split(), "--calibration_data", str(C4), "--log_dir", str(folder.parent),
                    "--save_ckpt_log_name", folder.name, "--save_model"], cwd=REPO, env=ENV, check=True)


def recover(name: str, pruned: Path, teacher: str, out: Path, args, settings: dict[str, float] | None = None) -> dict:
    settings = settings or {}
    lr = settings.get("lr", args.lr_full if "full" in name else args.lr_lora)
    temperature = settings.get("T", args.temperature)
    flags = RUNS[name] + (["--teacher", teacher, "--kd_temperature", str(temperature)] if "KD" in name else [])
    cmd = [sys.executable, "post_training.py", "--prune_model", str(pruned), "--distill_on", str(C4),
           "--output_dir", str(out), "--batch_size", str(args.batch), "--micro_batch_size", str(args.micro),
           "--max_steps", str(args.steps), "--num_epochs", "100", "--cutoff_len", str(args.cutoff),
           "--val_set_size", "0", "--save_steps", "1000000", "--logging_steps", "4", "--learning_rate", str(lr),
           "--warmup_steps", str(max(1, args.steps // 10)), "--seed", "0",
           *([] if args.throughput_only else ["--merge"]), *flags]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True)
    report = json.loads((out / "recovery_report.json").read_text())
    tokens = args.steps * args.batch * args.cutoff
    return {"run": name, "lr": f"{lr:g}", "T": f"{temperature:g}" if "KD" in name else "", "tokens": tokens, "epochs": round(args.steps * args.batch / args.blocks, 2),
            "train_s": round(report["train_runtime_s"], 1),
            "tokens_per_s": round(tokens / report["train_runtime_s"], 1),
            "wall_s": round(time.perf_counter() - start, 1),
            **({} if args.throughput_only else protocol_ppl(str(out / "merged")))}


def count_blocks(pruned: Path, cutoff: int) -> int:
    """How many ``cutoff``-token blocks ``c4_demo.jsonl`` packs into (what post_training trains on)."""
    from transformers import AutoTokenizer

    from LLMPruner.recover.packing import load_documents, pack_documents
    return len(pack_documents(load_documents(C4), AutoTokenizer.from_pretrained(pruned), cutoff, add_eos=False))


def throughput(pruned: Path, work: Path, args) -> dict:
    """Alternate the runs ``--repeat`` times in one process; each run's median tokens/s, its spread and the
    ratio of the medians to LoRA + CE's, and the spread of the per-round ratios."""
    per_run: dict[str, list[float]] = {}
    rounds: list[dict[str, float]] = []
    for _ in range(args.repeat):
        rounds.append({})
        for name, settings in parse_runs(args.runs):
            row = recover(name, pruned, args.smollm2, work / ("tp_" + name.replace(" + ", "_")), args, settings)
            print(json.dumps(row), flush=True)
            per_run.setdefault(name, []).append(row["tokens_per_s"])
            rounds[-1][name] = row["tokens_per_s"]
    base = statistics.median(per_run["LoRA + CE"]) if "LoRA + CE" in per_run else None
    rows = []
    for name, speeds in per_run.items():
        ratios = [r[name] / r["LoRA + CE"] for r in rounds if base]
        rows.append({"run": name, "tokens": args.steps * args.batch * args.cutoff, "tokens_per_s": speeds,
                     "median": statistics.median(speeds), "min..max": f"{min(speeds):.1f}..{max(speeds):.1f}",
                     "median / LoRA+CE": statistics.median(speeds) / base if base else "",
                     "per-round ratio min..max": f"{min(ratios):.2f}..{max(ratios):.2f}" if base else ""})
    print(table(rows, ["run", "tokens", "median", "min..max", "median / LoRA+CE", "per-round ratio min..max"]))
    return {"args": vars(args), "rows": rows}


def main() -> None:
    global EVAL_WINDOWS, EVAL_SETS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2", default=str(GGUF), help="the dense model (GGUF folder, or a safetensors copy)")
    p.add_argument("--prune_flags", default=PRUNE_FLAGS, help="hf_prune.py flags (quoted)")
    p.add_argument("--work", default=None, help="folder for the pruned model and the runs (default: a tmp dir)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=8, help="blocks per optimizer step")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256, help="tokens per packed block")
    p.add_argument("--lr_lora", type=float, default=2e-3, help="LoRA learning rate (CE and KD alike)")
    p.add_argument("--lr_full", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval_windows", type=int, default=160, help="first N of the protocol's 160 windows per set")
    p.add_argument("--eval_sets", default=",".join(EVAL_SETS), help="comma-separated subset of: wikitext2, ptb")
    p.add_argument("--out", default=None, help="result JSON (default results/recover_smollm2.json)")
    p.add_argument("--throughput_only", action="store_true",
                   help="tokens/s only: no perplexity, no merge (WORK/pruned must exist); --repeat rounds")
    p.add_argument("--repeat", type=int, default=3, help="with --throughput_only: alternate the runs N times")
    p.add_argument("--runs", default=",".join(RUNS),
                   help="comma-separated runs among: " + ", ".join(RUNS) + "; each may add @lr=FLOAT and (KD) @T=FLOAT")
    args = p.parse_args()
    EVAL_WINDOWS = args.eval_windows
    EVAL_SETS = tuple(filter(None, args.eval_sets.split(",")))
    bad = [s for s in EVAL_SETS if s not in ("wikitext2", "ptb")]
    if bad or not EVAL_SETS:
        sys.exit(f"--eval_sets: {args.eval_sets!r}; allowed: a comma-separated subset of wikitext2, ptb")
    runs = parse_runs(args.runs)
    torch.set_num_threads(1)
    for need in (C4, PROTOCOL):
        if not need.exists():
            sys.exit(f"this benchmark needs {need} (../shared), which is absent")
    work = Path(args.work or tempfile.mkdtemp(prefix="recover_smollm2_"))
    pruned = work / "pruned"
    if not (args.throughput_only or (pruned / "config.json").is_file()):
        prune(args.smollm2, pruned, args.prune_flags)
    args.blocks = count_blocks(pruned, args.cutoff)
    print(f"{C4.name}: {args.blocks} blocks of {args.cutoff} tokens; {args.steps} x {args.batch} blocks = "
          f"{args.steps * args.batch / args.blocks:.2f} epochs", flush=True)
    if args.throughput_only:
        result = throughput(pruned, work, args)
        out = REPO / "results" / "recover_smollm2_throughput.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        return
    rows = [{"run": "dense", "label": "dense", **protocol_ppl(args.smollm2)},
            {"run": "pruned", "label": "pruned", **protocol_ppl(str(pruned))}]
    print(json.dumps(rows), flush=True)
    for name, settings in runs:
        folder = run_label(name, settings).replace(" + ", "_").replace(" ", "").replace("@", "_").replace("=", "")
        rows.append({**recover(name, pruned, args.smollm2, work / folder, args, settings),
                     "label": run_label(name, settings)})
        print(json.dumps(rows[-1]), flush=True)
    gains(rows)
    out = Path(args.out) if args.out else REPO / "results" / "recover_smollm2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table(rows, ["label", "lr", "T", "tokens", "epochs", "train_s", "tokens_per_s", "speed / LoRA+CE",
                       *[c for s in EVAL_SETS for c in (s, s + "_gain", s + "_recovered")], "gain / LoRA+CE"]))


def gains(rows: list[dict]) -> None:
    """Per set: gain over the pruned model (rows[1]) and share of the dense-pruned gap recovered (rows[0]);
    against the first LoRA + CE run, the gain ratio (WikiText-2 if evaluated, else the first set) and speed."""
    sets = [s for s in ("wikitext2", "ptb") if s in rows[0]]
    base = next((r for r in rows[2:] if r["run"] == "LoRA + CE"), None)
    for r in rows[2:]:
        for s in sets:
            r[s + "_gain"] = rows[1][s] - r[s]
            r[s + "_recovered"] = f"{100 * r[s + '_gain'] / (rows[1][s] - rows[0][s]):.0f} %"
        if base is not None:
            r["gain / LoRA+CE"] = r[sets[0] + "_gain"] / base[sets[0] + "_gain"]
            r["speed / LoRA+CE"] = r["tokens_per_s"] / base["tokens_per_s"]


if __name__ == "__main__":
    main()
