"""Perplexity: the reference's protocol by default, the standard sliding window as an option.

``reference``: text joined with "\\n\\n", ``ppl = exp(mean token NLL)`` over ``numel // seq_len``
non-overlapping windows of ``seq_len`` tokens (WikiText-2 test, PTB validation), exactly as
LLM-Pruner's ``PPLMetric``; the first token of each window is never scored.

``sliding``: windows of ``seq_len`` tokens moved by ``stride``; each window scores only the tokens
not scored by the previous one, so every token after the first is scored once with up to
``seq_len - stride`` tokens of context (the Hugging Face "perplexity of fixed-length models" recipe).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from LLMPruner.data.text import read_hf_documents

logger = logging.getLogger(__name__)

Protocol = Literal["reference", "sliding"]
from LLMPruner.options import PROTOCOLS  # noqa: E402,F401  (re-exported)

from LLMPruner.options import PPL_DATASETS  # noqa: E402,F401  (re-exported)


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


#: what each known text is, as the figures should say
_TEXTS = {"wikitext2": "WikiText-2 test split", "ptb": "PTB validation split (the paper's)"}


def describe_ppl(name: str, seq_len: int, protocol: Protocol = "reference", stride: int | None = None,
                 max_windows: int | None = None) -> str:
    """Which text and windows a perplexity figure of ``evaluate_ppl`` is, in one line: the whole split,
    tokenized once, in every window (``bench/smollm2.py``'s protocol figures use the first 160 windows of
    WikiText-2 test and PTB *test* instead, so the two differ)."""
    text = _TEXTS.get(name, f"the file {name}")
    first = f"the first {max_windows}" if max_windows else "all"
    windows = (f"{first} non-overlapping {seq_len}-token windows" if protocol == "reference" else
               f"{seq_len}-token windows moved by {stride or max(seq_len // 2, 1)} tokens (sliding)")
    whole = "whole, " if not max_windows else ""
    return f"{text}, {whole}rows joined by blank lines; {windows}; PPL = exp(mean next-token NLL)"


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int, batch_size: int = 4,
               device: str | torch.device | None = None, desc: str = "ppl", max_windows: int | None = None) -> float:
    """Perplexity of ``input_ids`` (1-D) over non-overlapping windows of ``seq_len`` tokens (the first
    ``max_windows`` of them when given)."""
    n = input_ids.numel() // seq_len
    n = n if max_windows is None else min(n, max_windows)
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


@torch.no_grad()
def sliding_perplexity(model, input_ids: torch.Tensor, seq_len: int, stride: int,
                       device: str | torch.device | None = None, desc: str = "ppl") -> float:
    """Perplexity of ``input_ids`` (1-D) with overlapping windows of ``seq_len`` moved by ``stride``."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"--ppl_stride {stride}: must be in 1..--max_seq_len ({seq_len})")
    total = input_ids.numel()
    if total < 2:
        raise ValueError(f"text has {total} tokens; perplexity needs at least 2")
    device = device or next(model.parameters()).device
    total_nll, total_tokens, scored_until = 0.0, 0, 1  # token 0 has no context: never scored
    starts = list(range(0, max(total - seq_len, 0) + stride, stride))
    for begin in tqdm(starts, desc=desc, leave=False):
        end = min(begin + seq_len, total)
        if end <= scored_until:
            break
        window = input_ids[begin:end].unsqueeze(0).to(device)          # [1, T]
        logits = model(window, use_cache=False).logits.float()[0, :-1]  # [T-1, V] predicts window[1:]
        first = scored_until - begin - 1  # index into the shifted targets of the first unscored token
        nll = F.cross_entropy(logits[first:], window[0, 1:][first:], reduction="sum")
        total_nll += nll.item()
        total_tokens += end - scored_until
        scored_until = end
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise FloatingPointError(f"{desc}: non-finite loss; try --eval_dtype float32")
    return math.exp(mean)


def evaluate_ppl(model, tokenizer, datasets: list[str], seq_len: int = 128, batch_size: int = 4,
                 data_dir: str | Path | None = None, device=None, protocol: Protocol = "reference",
                 stride: int | None = None, max_windows: int | None = None) -> dict[str, float]:
    """``{name: ppl}`` for each dataset name (or text file path); ``max_windows``: the first that many
    windows only (the reference protocol).

    ``protocol="sliding"`` uses overlapping windows moved by ``stride`` (default ``seq_len // 2``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"--ppl_protocol {protocol!r}: use one of {list(PROTOCOLS)}")
    was_training = model.training
    model.eval()
    results = {}
    for name in datasets:
        ids = tokenizer(load_ppl_text(name, data_dir), return_tensors="pt").input_ids[0]
        if ids.numel() < seq_len:
            raise ValueError(f"perplexity text {name!r}: {ids.numel()} tokens, fewer than one window of "
                             f"{seq_len}; give a longer text or a smaller sequence length")
        if protocol == "reference":
            results[name] = perplexity(model, ids, seq_len, batch_size, device, desc=f"ppl {name}",
                                       max_windows=max_windows)
        else:
            results[name] = sliding_perplexity(model, ids, seq_len, stride or max(seq_len // 2, 1),
                                               device, desc=f"ppl {name}")
        logger.info("PPL %s: %.4f (%d tokens, seq_len %d, %s)", name, results[name], ids.numel(),
                    seq_len, protocol)
    model.train(was_training)
    return results
