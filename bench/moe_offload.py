"""Peak host memory and wall time of expert pruning in memory vs ``--offload`` on a synthetic Qwen3-MoE.

    python bench/moe_offload.py                       # ~0.8 GB fp32 model: 8 layers x 64 experts
    python bench/moe_offload.py --layers 12 --experts 96 --max_memory 300MB

No MoE checkpoint is available here, so the model is a random Qwen3-MoE built in code and saved sharded
(memory and time do not depend on the weights' values; quality is not measured). Each run is a fresh
subprocess running ``hf_prune.py --prune_experts`` whole (load or place, calibrate, score, choose, write);
its peak resident set (``VmHWM``) is read when it exits. An "empty" run imports torch, transformers and
LLMPruner only. The two pruned checkpoints are compared tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED, table

CHILD = r"""
import runpy, sys
sys.argv = ["hf_prune.py"] + {argv!r}
sys.path.insert(0, {repo!r})
status = 0
if sys.argv[1:]:
    try:
        runpy.run_path({script!r}, run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code or 0
else:
    import torch, transformers, LLMPruner  # noqa: F401
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("PEAK_KB", hwm, "STATUS", status)
"""


def build(folder: Path, layers: int, experts: int, hidden: int, width: int, shard: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    config = AutoConfig.for_model("qwen3_moe", vocab_size=512, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                                  intermediate_size=2 * width, moe_intermediate_size=width, num_experts=experts,
                                  num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size=shard)
    AutoTokenizer.from_pretrained(SHARED / "models" / "stories260K").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(argv: list[str]) -> tuple[float, float, int]:
    code = CHILD.format(argv=argv, repo=str(REPO), script=str(REPO / "hf_prune.py"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    line = [l for l in proc.stdout.splitlines() if l.startswith("PEAK_KB")]
    if not line:
        raise RuntimeError(proc.stderr[-3000:])
    _, kb, _, status = line[-1].split()
    if int(status):
        raise RuntimeError(f"hf_prune.py {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return seconds, int(kb) / 1024, int(status)


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--width", type=int, default=256, help="one expert's intermediate size")
    p.add_argument("--prune", type=int, default=16, help="experts removed per layer")
    p.add_argument("--max_memory", default="150MB", help="--offload's placement budget")
    p.add_argument("--shard", default="100MB", help="max_shard_size of the synthetic checkpoint")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = build(tmp / "dense", args.layers, args.experts, args.hidden, args.width, args.shard)
        size = sum(f.stat().st_size for f in (tmp / "dense").glob("*.safetensors")) / 2**20
        common = ["--base_model", str(tmp / "dense"), "--prune_experts", str(args.prune), "--calibration_data",
                  str(SHARED / "data" / "c4" / "c4_demo.jsonl"), "--num_examples", "16", "--calibration_seq_len",
                  "128", "--device", "cpu", "--eval_device", "cpu", "--log_dir", str(tmp / "log")]
        rows = []
        seconds, peak, _ = run([])
        rows.append({"run": "empty (imports only)", "seconds": seconds, "peak RSS MB": peak})
        seconds, peak, _ = run(common + ["--save_model", "--save_ckpt_log_name", "memory"])
        rows.append({"run": "in memory", "seconds": seconds, "peak RSS MB": peak})
        seconds, peak, _ = run(common + ["--offload", "--max_memory", args.max_memory, "--save_ckpt_log_name", "disk"])
        placed = json.loads((tmp / "log" / "disk" / "results.json").read_text())["placement"]
        rows.append({"run": f"--offload --max_memory {args.max_memory} (placed on {placed})", "seconds": seconds,
                     "peak RSS MB": peak})
        same = same_tensors(tmp / "log" / "memory", tmp / "log" / "disk")
    print(f"synthetic qwen3_moe: {args.layers} layers x {args.experts} experts (width {args.width}, hidden "
          f"{args.hidden}), {params:,} parameters, {size:.0f} MB fp32 on disk; removing {args.prune} experts per layer")
    print(table(rows, ["run", "seconds", "peak RSS MB"]))
    print(f"pruned checkpoints identical tensor by tensor: {same}")


if __name__ == "__main__":
    main()
