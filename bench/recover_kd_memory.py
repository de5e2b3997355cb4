"""Peak memory and time of the distillation loss: chunked fused head vs full logits (CPU, one thread).

    python bench/recover_kd_memory.py [--tokens 1024 4096] [--vocab 49152] [--hidden 576]

Each row is a fresh process that builds student/teacher hidden states [N, H] and a head [V, H] (SmolLM2's
sizes by default), then computes loss + backward (gradients for the hidden states and the head weight):
``chunked`` is ``kd_loss.chunked_kd_loss`` (256-token chunks), ``full logits`` the plain autograd formula on
[N, V] logits (what a straightforward KD ``compute_loss`` does). Peak = max RSS increase over the inputs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, table  # noqa: E402


def child(mode: str, n: int, v: int, h: int) -> None:
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(REPO))
    from LLMPruner.recover.kd_loss import chunked_kd_loss
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hs, ws = torch.randn(n, h, requires_grad=True), (torch.randn(v, h) * 0.05).requires_grad_()
    ht, wt, y = torch.randn(n, h), torch.randn(v, h) * 0.05, torch.randint(0, v, (n,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "chunked":
        loss = chunked_kd_loss(hs, ht, y, student_weight=ws, teacher_weight=wt, chunk=256).loss
    else:
        zs, zt = hs @ ws.T, (ht @ wt.T)
        loss = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="batchmean")
    loss.backward()
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"peak_mib": round(peak), "seconds": round(seconds, 3), "loss": round(loss.item(), 5)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="N labelled positions")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], *map(int, args.child[1:]))
    rows = []
    for n in args.tokens:
        for mode in ("full logits", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(n), str(args.vocab), str(args.hidden)],
                                 capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1"})
            rows.append({"tokens N": n, "way": mode, "logits MiB (N x V fp32)": round(n * args.vocab * 4 / 2**20),
                         **json.loads(out.stdout.strip().splitlines()[-1])})
    print(table(rows, ["tokens N", "way", "logits MiB (N x V fp32)", "peak_mib", "seconds", "loss"]))


if __name__ == "__main__":
    main()
