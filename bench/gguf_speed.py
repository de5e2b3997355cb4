"""What a llama.cpp user sees: dense SmolLM2-135M vs the -20 % pruned models, exported to GGUF by LLMPruner.

    python bench/gguf_speed.py [--smollm2 /tmp/smollm2_fp32] [--threads 1] [--repeats 3]

"-20 % decoder" is ``SMOLLM2_MINUS_20`` (``--param_budget 0.2``: a fifth of the non-embedding parameters);
"-20 % all" the same setting with the budget raised so that a fifth of *all* parameters go, as the
paper counts (the tied embedding / LM head, 21 % of SmolLM2, is never pruned and costs every token
the same). The models are written as f16 and q8_0 GGUFs (the pruned ones as llama.cpp's ``deci``
architecture, with per-layer head counts and MLP widths; with the exporter's default padding of MLP
widths to multiples of 32, and once unpadded, ``pad_to=1``) and run in llama-cpp-python, one after the
other, alternating, in one process: prompt processing of 512 tokens in one batch (tokens/s), then
generation of 128 tokens one at a time as llama-bench's tg128 does (tokens/s); median of ``--repeats``
runs. Time is the process's CPU time (with one thread, what the wall clock shows on an idle machine; on a shared machine it is not
inflated by other processes' turns on the cores; ``--wall`` uses the wall clock). Token ids are
WikiText-2's (the SmolLM2 protocol windows), so no sampling enters the timing. Without ``--smollm2``
the model is dequantised from ../shared's Q4_1 GGUF (~35 s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import gguf
import torch

from common import SHARED, table

from LLMPruner.select.budget import non_embedding_parameters
from LLMPruner.checkpoint import load_model
from LLMPruner.export import export_gguf
from LLMPruner.prune import prune

SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct-Q4_1"
PROTOCOL = SHARED / "data" / "smollm2_protocol.json"
#: the -20 % SmolLM2 setting (tests/test_export_gguf_llamacpp.py uses it too; change it here only)
#: the structure of the best measured setting (bench/smollm2.py: Taylor, MLP channels only, spread uniformly
#: over layers 4..27); here scored on the protocol's 10 x 64 calibration ids, which changes which channels
#: go, not the shapes that llama.cpp runs
SMOLLM2_MINUS_20 = dict(mode="block_wise", pruner_type="taylor", taylor="param_first", param_budget=0.2,
                        attention_layers=range(0), mlp_layers=range(4, 28))


def pruned_smollm2(source: Path | str, **overrides):
    """``(pruned, tokenizer)``: SmolLM2 pruned by ``SMOLLM2_MINUS_20`` (the protocol's 10 x 64 calibration ids)."""
    model, tok = load_model(source, dtype=torch.float32)
    calib = torch.tensor(json.loads(PROTOCOL.read_text())["calib"])
    prune(model, examples=calib, **{**SMOLLM2_MINUS_20, **overrides})
    return model, tok


def prompt_tps(llm, ids: list[int], clock=time.process_time) -> float:
    llm.reset()
    t0 = clock()
    llm.eval(ids)
    return len(ids) / (clock() - t0)


def generation_tps(llm, ids: list[int], clock=time.process_time) -> float:
    llm.reset()
    llm.eval(ids[:1])
    t0 = clock()
    for token in ids[1:]:
        llm.eval([token])
    return (len(ids) - 1) / (clock() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", default=str(SMOLLM2_GGUF), help="SmolLM2 folder or GGUF (default: ../shared's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt_tokens", type=int, default=512)
    ap.add_argument("--gen_tokens", type=int, default=128)
    ap.add_argument("--wall", action="store_true", help="time with the wall clock instead of CPU time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llama_cpp import Llama
    windows = json.loads(PROTOCOL.read_text())["wikitext2"]
    text_ids = [t for w in windows for t in w]
    prompt, gen = text_ids[:args.prompt_tokens], text_ids[:args.gen_tokens + 1]
    dense, tok = load_model(args.smollm2, dtype=torch.float32)
    total = sum(p.numel() for p in dense.parameters())
    pruned, _ = pruned_smollm2(args.smollm2)
    # the paper's "-20 %" counts every parameter; the tied 49152 x 576 embedding / LM head is 21 % of SmolLM2
    all_budget = round(0.2 * total / non_embedding_parameters(dense), 4)
    pruned_all, _ = pruned_smollm2(args.smollm2, param_budget=all_budget)
    with tempfile.TemporaryDirectory(prefix="gguf-speed-") as tmp:
        variants = (("dense", dense, 32), ("-20 % decoder, unpadded", pruned, 1), ("-20 % decoder", pruned, 32),
                    (f"-20 % all (budget {all_budget})", pruned_all, 32))
        model_of = {name: model for name, model, _ in variants}
        files = {(name, outtype): export_gguf(model, tok, Path(tmp) / f"{i}-{outtype}.gguf", outtype=outtype,
                                              pad_to=pad)
                 for i, (name, model, pad) in enumerate(variants) for outtype in ("f16", "q8_0")}
        llms = {key: Llama(str(path), n_ctx=args.prompt_tokens + 8, n_batch=args.prompt_tokens,
                           n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
                for key, path in files.items()}
        clock = time.perf_counter if args.wall else time.process_time
        pp = {key: [] for key in llms}
        tg = {key: [] for key in llms}
        for _ in range(args.repeats):  # alternate so that load on the machine hits all alike
            for key, llm in llms.items():
                pp[key].append(prompt_tps(llm, prompt, clock))
                tg[key].append(generation_tps(llm, gen, clock))
        rows = []
        for (name, outtype), path in files.items():
            key = (name, outtype)
            dense_key = ("dense", outtype)
            arch = gguf.GGUFReader(path).fields["general.architecture"].contents()
            rows.append({"model": name, "type": outtype, "llama.cpp arch": arch,
                         "params": sum(p.numel() for p in model_of[name].parameters()),
                         "decoder params": non_embedding_parameters(model_of[name]),
                         "file MiB": round(path.stat().st_size / 2**20, 1),
                         f"prompt {args.prompt_tokens} tok/s": statistics.median(pp[key]),
                         f"gen {args.gen_tokens} tok/s": statistics.median(tg[key]),
                         "prompt speedup": statistics.median(pp[key]) / statistics.median(pp[dense_key]),
                         "gen speedup": statistics.median(tg[key]) / statistics.median(tg[dense_key])})
        for llm in llms.values():
            llm.close()
    print(f"llama-cpp-python, n_threads={args.threads}, median of {args.repeats} alternating runs, "
          f"{'wall-clock' if args.wall else 'CPU'} time")
    print(table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
