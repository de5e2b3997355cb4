"""Instruction data for recovery: read, validate, tokenize with prompt masking, split, cache.

Sources: a Hugging Face dataset name (default ``yahma/alpaca-cleaned``), a local ``.json`` / ``.jsonl``
file, or a local ``.txt`` file (blank-line separated documents). Schemas: Alpaca (``instruction``,
``input``, ``output``; ``input`` may be absent), LaMini (``instruction``, ``response``) and plain text
(``text``: no template, every token trained on — for in-domain recovery).

Each example becomes ``input_ids`` (the full prompt + answer, cut at ``cutoff_len``, EOS appended when
it fits) and ``labels`` (a copy with the prompt tokens set to -100 unless ``train_on_inputs``).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from LLMPruner.recover.prompts import Prompter

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
Schema = Literal["alpaca", "lamini", "text"]
#: schema -> (required fields, the answer field)
SCHEMAS: dict[str, tuple[tuple[str, ...], str]] = {
    "alpaca": (("instruction", "output"), "output"),
    "lamini": (("instruction", "response"), "response"),
    "text": (("text",), "text"),
}


class DataFormatError(ValueError):
    """A data file that cannot be used for instruction tuning (the message names the file and record)."""


def _parse_file(path: Path) -> list:
    raw = path.read_text(encoding="utf-8")
    if not raw.strip():
        raise DataFormatError(f"--data_path {str(path)!r}: the file is empty")
    if path.suffix == ".txt":
        return [{"text": doc.strip()} for doc in raw.split("\n\n") if doc.strip()]
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"--data_path {str(path)!r}: line {lineno} is not valid JSON "
                                          f"({err.msg})") from err
        return records
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"--data_path {str(path)!r}: not valid JSON ({err.msg} at line {err.lineno}); "
                              f"expected a list of records, or use .jsonl for one record per line") from err
    if isinstance(records, dict) and isinstance(records.get("data", records.get("train")), list):
        records = records.get("data", records.get("train"))
    if not isinstance(records, list):
        raise DataFormatError(f"--data_path {str(path)!r}: expected a JSON list of records, "
                              f"got a {type(records).__name__}")
    return records


def detect_schema(records: list, source: str) -> Schema:
    """The schema of ``records``, checking every record has the required string fields."""
    if not records:
        raise DataFormatError(f"--data_path {source!r}: no records")
    first = records[0]
    if not isinstance(first, dict):
        raise DataFormatError(f"--data_path {source!r}: record 0 is a {type(first).__name__}, not an object")
    schema = next((name for name, (_, answer) in SCHEMAS.items() if answer in first), None)
    if schema is None:
        raise DataFormatError(f"--data_path {source!r}: record 0 has fields {sorted(first)}; expected the "
                              f"Alpaca schema (instruction, input, output), LaMini (instruction, response) "
                              f"or plain text (text)")
    required, _ = SCHEMAS[schema]
    for i, record in enumerate(records):
        bad = [f for f in required if not isinstance(record, dict) or not isinstance(record.get(f), str)]
        if bad:
            raise DataFormatError(f"--data_path {source!r}: record {i} lacks string field(s) {bad} "
                                  f"required by the {schema} schema {list(required)}")
    return schema  # type: ignore[return-value]


def load_instruction_records(data_path: str) -> tuple[list[dict], Schema]:
    """Records and schema of a local ``.json``/``.jsonl`` file or a Hugging Face dataset's train split."""
    path = Path(data_path)
    if path.suffix in (".json", ".jsonl", ".txt") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"--data_path {data_path!r}: no such file")
        records = _parse_file(path)
    else:
        from datasets import load_dataset
        try:
            records = load_dataset(data_path, split="train").to_list()
        except Exception as err:  # offline, unknown name
            raise RuntimeError(f"--data_path {data_path!r}: could not load the dataset ({type(err).__name__}: "
                               f"{err}); offline, pass a local .json/.jsonl file in the Alpaca schema or a .txt file") from err
    return records, detect_schema(records, data_path)


def tokenize_example(record: dict, schema: Schema, tokenizer, prompter: Prompter, cutoff_len: int,
                     train_on_inputs: bool = False, add_eos_token: bool = True) -> dict[str, list[int]]:
    """``input_ids``/``attention_mask``/``labels`` of one record (prompt masked unless train_on_inputs)."""
    answer = record[SCHEMAS[schema][1]]
    user_prompt = "" if schema == "text" else prompter.generate_prompt(record["instruction"], record.get("input"))
    ids = tokenizer(user_prompt + answer, truncation=True, max_length=cutoff_len)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = len(tokenizer(user_prompt, truncation=True, max_length=cutoff_len)["input_ids"])
        labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _cache_key(data_path: str, tokenizer, **options) -> str:
    path = Path(data_path)
    stamp = f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else ""
    blob = json.dumps({"data": str(data_path), "stamp": stamp, "vocab": len(tokenizer),
                       "tok": tokenizer.name_or_path, **options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_instruction_datasets(data_path: str, tokenizer, cutoff_len: int = 256, val_set_size: int = 2000,
                               prompt_template_name: str | None = "alpaca", train_on_inputs: bool = False,
                               add_eos_token: bool = True, seed: int = 42, cache_dir: str | Path | None = None):
    """``(train, val)`` tokenized ``datasets.Dataset``s (``val`` is None when ``val_set_size`` is 0)."""
    from datasets import Dataset, load_from_disk
    options = dict(cutoff_len=cutoff_len, val=val_set_size, template=prompt_template_name,
                   train_on_inputs=train_on_inputs, eos=add_eos_token, seed=seed)
    cached = Path(cache_dir) / _cache_key(data_path, tokenizer, **options) if cache_dir else None
    if cached is not None and (cached / "train").exists():
        logger.info("tokenized data from cache %s", cached)
        train = load_from_disk(str(cached / "train"))
        val = load_from_disk(str(cached / "val")) if (cached / "val").exists() else None
        return train, val
    records, schema = load_instruction_records(data_path)
    if val_set_size < 0 or val_set_size >= len(records):
        raise ValueError(f"--val_set_size {val_set_size}: must be in [0, {len(records) - 1}] for the "
                         f"{len(records)} records of {data_path!r}")
    prompter = Prompter(prompt_template_name)
    rows = [tokenize_example(r, schema, tokenizer, prompter, cutoff_len, train_on_inputs, add_eos_token)
            for r in records]
    kept = [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]
    if not kept:
        raise ValueError(f"--cutoff_len {cutoff_len}: every example's prompt fills the cutoff, leaving no answer "
                         f"token to train on; raise --cutoff_len or use --train_on_inputs")
    if len(kept) < len(rows):
        logger.warning("%d of %d examples dropped: their prompt fills --cutoff_len %d (no answer token left)",
                       len(rows) - len(kept), len(rows), cutoff_len)
    if val_set_size >= len(kept):
        raise ValueError(f"--val_set_size {val_set_size}: only {len(kept)} usable examples remain")
    data = Dataset.from_list(kept)
    logger.info("%d %s records from %s, cutoff %d", len(kept), schema, data_path, cutoff_len)
    if val_set_size:
        split = data.train_test_split(test_size=val_set_size, shuffle=True, seed=seed)
        train, val = split["train"].shuffle(seed=seed), split["test"]
    else:
        train, val = data.shuffle(seed=seed), None
    if cached is not None:
        train.save_to_disk(str(cached / "train"))
        if val is not None:
            val.save_to_disk(str(cached / "val"))
        logger.info("tokenized data cached at %s", cached)
    return train, val


def build_text_eval_dataset(name: str, tokenizer, seq_len: int, data_dir: str | Path | None = None,
                            max_windows: int | None = None):
    """Language-modelling windows of a perplexity corpus (``wikitext2``, ``ptb`` or a text file)."""
    from datasets import Dataset

    from LLMPruner.evaluate.ppl import load_ppl_text
    ids = tokenizer(load_ppl_text(name, data_dir), return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"--extra_val_dataset {name!r}: {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len).tolist()
    return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_len] * n, "labels": windows})
