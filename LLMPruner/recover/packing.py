"""Plain text for recovery, packed into fixed-length blocks (``--distill_on FILE``).

Documents come from a ``.txt`` file (separated by blank lines) or a ``.json`` / ``.jsonl`` file of records
with a ``text`` field. Each document is tokenized as the tokenizer does (BOS when it adds one), EOS is
appended, all are concatenated and cut into blocks of ``block_len`` tokens (the ragged tail is dropped),
so every training example has exactly ``block_len`` tokens and a run's token count is
``steps x batch x block_len``. Every token is a target (``labels == input_ids``).
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)


def load_documents(path: str | Path, flag: str = "--distill_on") -> list[str]:
    """The documents of a ``.txt`` / ``.json`` / ``.jsonl`` file (errors name ``flag`` and the record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r}: no such file (expected a .txt, .json or .jsonl file, "
                                f"or 'instruction' for the --data_path examples)")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    elif path.suffix in (".json", ".jsonl"):
        try:
            records = json.loads(raw) if path.suffix == ".json" else [json.loads(line) for line in
                                                                      raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag} {str(path)!r}: not valid JSON ({err.msg})") from err
        docs = []
        for i, r in enumerate(records if isinstance(records, list) else [records]):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise ValueError(f"{flag} {str(path)!r}: record {i} has no string field 'text'")
            if r["text"].strip():
                docs.append(r["text"])
    else:
        raise ValueError(f"{flag} {str(path)!r}: unknown file type {path.suffix!r}; use .txt, .json or .jsonl")
    if not docs:
        raise ValueError(f"{flag} {str(path)!r}: no non-empty documents")
    return docs


def pack_documents(docs: list[str], tokenizer, block_len: int, add_eos: bool = True) -> list[list[int]]:
    """Token blocks of exactly ``block_len`` ids from the concatenated documents."""
    eos = tokenizer.eos_token_id if add_eos else None
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // block_len
    return [stream[i * block_len:(i + 1) * block_len] for i in range(n)]


def build_packed_datasets(path: str | Path, tokenizer, block_len: int, val_set_size: int = 0, seed: int = 42,
                          add_eos: bool = True):
    """``(train, val)`` ``datasets.Dataset``s of packed blocks (``val`` is None when ``val_set_size`` is 0);
    the held-out blocks are a seeded random choice."""
    from datasets import Dataset
    blocks = pack_documents(load_documents(path), tokenizer, block_len, add_eos)
    if len(blocks) <= val_set_size:
        raise ValueError(f"--val_set_size {val_set_size}: {path} packs into only {len(blocks)} blocks of "
                         f"--cutoff_len {block_len} tokens; lower --val_set_size or --cutoff_len")
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    rows = lambda idx: Dataset.from_dict({"input_ids": [blocks[i] for i in idx],  # noqa: E731
                                          "attention_mask": [[1] * block_len for _ in idx],
                                          "labels": [blocks[i] for i in idx]})
    logger.info("%d blocks of %d tokens from %s (%d held out)", len(blocks), block_len, path, val_set_size)
    val = rows(order[:val_set_size]) if val_set_size else None
    return rows(order[val_set_size:]), val
