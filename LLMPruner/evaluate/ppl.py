"""Perplexity with the reference's protocol: text joined with "\\n\\n", non-overlapping windows.

``ppl = exp(mean token NLL)`` over ``numel // seq_len`` windows of ``seq_len`` tokens (WikiText-2 test,
PTB validation), exactly as LLM-Pruner's ``PPLMetric``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import read_hf_documents

logger = logging.getLogger(__name__)

#: dataset name -> (file inside a local data dir, HF name, HF config, split, field)
PPL_DATASETS = {
    "wikitext2": ("wikitext2/wiki.test.raw", "wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb/ptb.valid.txt", "ptb_text_only", "penn_treebank", "validation", "sentence"),
}


def load_ppl_text(name: str, data_dir: str | Path | None = None) -> str:
    """The evaluation text of ``name`` (a known dataset, or a path to a local text file)."""
    if name not in PPL_DATASETS:
        path = Path(name)
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise ValueError(f"unknown perplexity dataset {name!r}: use one of {sorted(PPL_DATASETS)} "
                         f"or a path to a text file")
    rel, hf_name, hf_config, split, field = PPL_DATASETS[name]
    if data_dir is not None:
        path = Path(data_dir) / rel
        if not path.is_file():
            raise FileNotFoundError(f"{name}: expected {path} under the local data dir {data_dir}")
        rows = path.read_text(encoding="utf-8").split("\n")
        if rows and rows[-1] == "":
            rows = rows[:-1]
        return "\n\n".join(rows)
    rows = read_hf_documents(hf_name, split=split, config=hf_config, field=field)
    return "\n\n".join(rows)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int, batch_size: int = 4,
               device: str | torch.device | None = None, desc: str = "ppl") -> float:
    """Perplexity of ``input_ids`` (1-D) over non-overlapping windows of ``seq_len`` tokens."""
    n = input_ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"text has {input_ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = input_ids[: n * seq_len].view(n, seq_len)
    device = device or next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise FloatingPointError(f"{desc}: non-finite loss; try --eval_dtype float32")
    return math.exp(mean)


def evaluate_ppl(model, tokenizer, datasets: list[str], seq_len: int = 128, batch_size: int = 4,
                 data_dir: str | Path | None = None, device=None) -> dict[str, float]:
    """``{name: ppl}`` for each dataset name (or text file path)."""
    was_training = model.training
    model.eval()
    results = {}
    for name in datasets:
        ids = tokenizer(load_ppl_text(name, data_dir), return_tensors="pt").input_ids[0]
        results[name] = perplexity(model, ids, seq_len, batch_size, device, desc=f"ppl {name}")
        logger.info("PPL %s: %.4f (%d tokens, seq_len %d)", name, results[name], ids.numel(), seq_len)
    model.train(was_training)
    return results
