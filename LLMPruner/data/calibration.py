"""Calibration samples for importance estimation: seeded random windows of ``seq_len`` tokens.

As in the reference, the default source is BookCorpus from the Hub; offline, any local ``.txt`` or
``.jsonl``/``.json`` (``text`` field) file, or another dataset name, works the same way.
"""
from __future__ import annotations

import logging
import random

import torch

from LLMPruner.data.text import is_local_source, read_documents, read_hf_documents

logger = logging.getLogger(__name__)


def load_calibration_text(source: str) -> list[str]:
    if is_local_source(source):
        return read_documents(source)
    if source == "bookcorpus":
        return read_hf_documents("bookcorpus", split="train")
    if source == "c4":
        return read_hf_documents("allenai/c4", split="validation", config="en")
    return read_hf_documents(source, split="train")


def calibration_examples(source: str, tokenizer, num_examples: int, seq_len: int = 64,
                         seed: int = 0) -> torch.Tensor:
    """``[num_examples, seq_len]`` token ids: one random window from each of random documents.

    Documents shorter than ``seq_len`` tokens are skipped; if none is long enough, the documents are
    concatenated into one stream and windows are drawn from it.
    """
    return calibration_windows(load_calibration_text(source), tokenizer, num_examples, seq_len, seed,
                               label=f"calibration source {source!r}")[0]


def calibration_windows(docs: list[str], tokenizer, num_examples: int, seq_len: int = 64,
                        seed: int = 0, label: str = "the calibration documents") -> tuple[torch.Tensor, list[int]]:
    """``calibration_examples`` on documents already read, with the indices of the documents the windows
    came from (all of them when the windows had to be drawn from the joined text): the other documents
    are held out from calibration (``heldout_windows``)."""
    if num_examples < 1:
        raise ValueError(f"--num_examples must be >= 1, got {num_examples}")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    windows: list[torch.Tensor] = []
    used: list[int] = []
    for i in order:
        ids = tokenizer(docs[i], return_tensors="pt").input_ids[0]
        if ids.numel() <= seq_len:
            continue
        start = rng.randint(0, ids.numel() - seq_len - 1)
        windows.append(ids[start:start + seq_len])
        used.append(i)
        if len(windows) == num_examples:
            return torch.stack(windows), used
    stream = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    if stream.numel() <= seq_len:
        raise ValueError(f"{label} has only {stream.numel()} tokens; need more than {seq_len}")
    logger.info("calibration: %d long documents, filling from the joined text", len(windows))
    while len(windows) < num_examples:
        start = rng.randint(0, stream.numel() - seq_len - 1)
        windows.append(stream[start:start + seq_len])
    return torch.stack(windows), list(range(len(docs)))


def heldout_windows(docs: list[str], tokenizer, used: list[int], num_windows: int,
                    seq_len: int = 128) -> torch.Tensor:
    """``[n, seq_len]`` token ids from the documents not in ``used``: consecutive non-overlapping windows,
    document by document in order, the first ``num_windows`` of them (fewer if the text runs out)."""
    skip = set(used)
    windows: list[torch.Tensor] = []
    for i, doc in enumerate(docs):
        if i in skip:
            continue
        ids = tokenizer(doc, return_tensors="pt").input_ids[0]
        windows += [ids[s:s + seq_len] for s in range(0, ids.numel() - seq_len + 1, seq_len)]
        if len(windows) >= num_windows:
            break
    if not windows:
        raise ValueError(f"no held-out document has {seq_len} tokens ({len(docs) - len(skip)} documents left "
                         "outside calibration)")
    return torch.stack(windows[:num_windows])
