"""Shared helpers for the benchmark scripts: the stories260K material and a fixed calibration/eval split."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LLMPRUNER_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories_val.txt"
CALIB_FRACTION = 0.2  # the first 20% of the stories calibrate, the rest is held out for perplexity


def require_shared() -> None:
    if not STORIES.exists() or not TINYSTORIES.exists():
        sys.exit(f"this benchmark needs {STORIES} and {TINYSTORIES} (../shared), which are absent")


def split_stories(tmp: Path) -> tuple[Path, Path]:
    """Write the calibration part and the held-out part of TinyStories to ``tmp``."""
    stories = TINYSTORIES.read_text(encoding="utf-8").split("\n\n")
    cut = int(len(stories) * CALIB_FRACTION)
    calib, held = tmp / "calib.txt", tmp / "heldout.txt"
    calib.write_text("\n\n".join(stories[:cut]), encoding="utf-8")
    held.write_text("\n\n".join(stories[cut:]), encoding="utf-8")
    return calib, held


def load_stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)


def random_llama_60m(seed: int = 0):
    """The ~60M-parameter random LLaMA of the issues: hidden 512, 8 layers, 8 heads, MLP 1376, vocab 32000."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=32000, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
