"""compress.py on SmolLM2-135M at -20 % of all parameters (107,613,504), as a user runs it, then the figures
the README's SmolLM2 tables use.

    python bench/compress_smollm2.py [--tokens 163840] [--curve_points 3] [--limit N] [--run_dir DIR]

1. ``compress.py`` with its defaults (recipe ``quality``, full-weight KD from the dense model): calibration
   and distillation text ``../shared/data/c4/c4_demo.jsonl`` (never WikiText-2 or PTB), perplexity on the
   first 160 windows of WikiText-2 test and PTB validation, PIQA and ARC-easy (full sets unless ``--limit``;
   acc_norm), GGUF export (llama.cpp tokens/s when llama-cpp-python is installed);
2. the protocol perplexities (``../shared/data/smollm2_protocol.json``: 160 windows of WikiText-2 test and PTB
   test, the README tables') of dense, pruned, recovered and each recovery checkpoint (the gain-vs-tokens curve).
One thread per process (``OMP_NUM_THREADS=1``); the run folder keeps everything, and a rerun resumes it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, table  # noqa: E402

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct-Q4_1"
C4 = SHARED / "data" / "c4" / "c4_demo.jsonl"
PROTOCOL = SHARED / "data" / "smollm2_protocol.json"
TARGET = 107_613_504  # -20 % of SmolLM2's 134,515,008 parameters


def protocol_ppl(model_path: str) -> dict[str, float]:
    import torch

    from LLMPruner.checkpoint import load_model
    from LLMPruner.evaluate.ppl import perplexity
    model, _ = load_model(model_path, dtype=torch.float32)
    ids = json.loads(PROTOCOL.read_text())
    with torch.no_grad():
        return {name: round(perplexity(model.eval(), torch.tensor(ids[name][:160]).flatten(), 128, 4), 2)
                for name in ("wikitext2", "ptb")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=163_840, help="recovery tokens (c4_demo.jsonl packs ~166k)")
    p.add_argument("--curve_points", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: full sets)")
    p.add_argument("--run_dir", default="/tmp/compress_smollm2")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(REPO / "compress.py"), "--base_model", str(GGUF), "--target_params", str(TARGET),
               "--calibration_data", str(C4), "--recover_tokens", str(args.tokens), "--curve_points",
               str(args.curve_points), "--ppl", "wikitext2", "ptb", "--data_dir", str(SHARED / "data"),
               "--ppl_windows", "160", "--tasks", "piqa,arc_easy", "--zeroshot_dir", str(SHARED / "data" / "zeroshot"),
               "--run_dir", args.run_dir, "--device", "cpu"] + (["--limit", str(args.limit)] if args.limit else [])
    print(" ".join(command), flush=True)
    subprocess.run(command, env=env, check=True, cwd=REPO)
    run = Path(args.run_dir)
    results = json.loads((run / "results.json").read_text())
    rows = results["evaluate"]["results"]
    models = {"dense": str(GGUF), "pruned": str(run / "prune"), "recovered": str(run / "recover" / "merged")}
    dense_avg = rows["dense"]["average"]["acc_norm"]
    out = []
    for name, path in models.items():
        ppl = protocol_ppl(path)
        r = rows[name]
        out.append({"model": name, "params": r["stats"]["params"], "WikiText-2": ppl["wikitext2"], "PTB": ppl["ptb"],
                    "PIQA": round(r["zeroshot"]["piqa"]["acc_norm"], 4),
                    "ARC-e": round(r["zeroshot"]["arc_easy"]["acc_norm"], 4),
                    "avg % of dense": round(100 * r["average"]["acc_norm"] / dense_avg, 1)})
    curve = [{"tokens": 0, **{k: v for k, v in out[1].items() if k in ("WikiText-2", "PTB")}}]
    for ckpt in sorted((run / "recover").glob("checkpoint-*"), key=lambda c: int(c.name.rpartition("-")[2])):
        ppl = protocol_ppl(str(ckpt))
        tokens = int(ckpt.name.rpartition("-")[2]) * 8 * 128
        curve.append({"tokens": tokens, "WikiText-2": ppl["wikitext2"], "PTB": ppl["ptb"]})
    stages = {s: (results.get(s) or {}).get("seconds") for s in ("prune", "recover", "evaluate", "export")}
    print(table(out, list(out[0])))
    print(table(curve, list(curve[0])))
    print(f"KD tokens/s: {results['recover'].get('tokens_per_s')}; llama.cpp tokens/s of the GGUF: "
          f"{results['export'].get('llamacpp_tokens_per_s')}; wall s per stage: {stages}")
    if args.out:
        Path(args.out).write_text(json.dumps({"models": out, "curve": curve, "stages": stages,
                                              "kd_tokens_per_s": results["recover"].get("tokens_per_s"),
                                              "llamacpp_tokens_per_s": results["export"].get("llamacpp_tokens_per_s")},
                                             indent=2))


if __name__ == "__main__":
    main()
