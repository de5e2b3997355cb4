"""Export a (pruned) checkpoint for another runtime: GGUF for llama.cpp / ollama / LM Studio.

    python export.py --model prune_log/llama_prune --to gguf --outfile pruned.gguf --outtype q8_0
    python -c "from llama_cpp import Llama; print(Llama('pruned.gguf')('Once upon a time', max_tokens=32))"

Layers of different shapes (block-wise pruning) are written as llama.cpp's ``deci`` architecture with
per-layer head counts and MLP widths; uniform models as ``llama``. ``--model`` takes anything
``--base_model`` does (a pruned folder, a Hugging Face folder, a .gguf). Details: docs/gguf.md.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from LLMPruner import cli
from LLMPruner.options import OUTTYPE_NAMES

logger = logging.getLogger("export")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True, help="pruned folder (or any checkpoint --base_model accepts)")
    p.add_argument("--to", default="gguf", choices=["gguf"], help="target format")
    p.add_argument("--outfile", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", default="f16", choices=OUTTYPE_NAMES,
                   help="tensor type: f32 (exact), f16 (default, as llama.cpp's converter), bf16, q8_0")
    p.add_argument("--tokenizer_pre", default=None,
                   help="llama.cpp pre-tokenizer name for a byte-level BPE tokenizer the exporter does not "
                        "recognise (e.g. llama-bpe, qwen2, smollm)")
    p.add_argument("--pad_to", type=int, default=32,
                   help="pad MLP widths with zero channels to a multiple of this (llama.cpp's fast kernels and "
                        "q8_0 blocks need multiples of 8-32; exact); 1 writes the pruned widths as they are")
    p.add_argument("--allow_pickle", action="store_true", help="as in hf_prune.py (reference pickles)")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    cli.check_source("--model", args.model, "model", "--model prune_log/NAME (hf_prune.py's folder)")
    cli.check_writable_dir("--outfile", Path(args.outfile).resolve().parent)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # every flag checked before torch and transformers are imported
    from LLMPruner.checkpoint import CheckpointError, load_model
    from LLMPruner.export import export_gguf
    # 1. load in float32 (the exporter converts to --outtype itself)
    model, tokenizer = load_model(args.model, dtype="float32", allow_pickle=args.allow_pickle)
    if tokenizer is None:
        raise CheckpointError(f"--model {args.model}: has no tokenizer files; a GGUF needs the tokenizer")
    # 2. write
    out = export_gguf(model, tokenizer, args.outfile, outtype=args.outtype, tokenizer_pre=args.tokenizer_pre,
                      pad_to=args.pad_to)
    # 3. report
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    cli.run(main, "export.py")
