"""Reading text from local files or Hugging Face datasets, offline-friendly.

Local formats: ``.txt``/``.raw`` (blank-line separated documents), ``.jsonl``/``.json`` (a ``text`` field,
or the field given). Anything else is taken as a Hugging Face dataset name (needs network or a cache).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".raw")
JSON_SUFFIXES = (".json", ".jsonl")


def is_local_source(source: str) -> bool:
    return Path(source).suffix in TEXT_SUFFIXES + JSON_SUFFIXES or Path(source).exists()


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """Documents of a local file: paragraphs of a text file, or ``field`` of each JSON record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    if path.suffix in JSON_SUFFIXES:
        raw = path.read_text(encoding="utf-8")
        try:
            records = json.loads(raw) if path.suffix == ".json" else \
                [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if isinstance(records, dict):
            records = records.get("data", records.get("rows", []))
        missing = [i for i, r in enumerate(records) if not isinstance(r, dict) or field not in r]
        if missing:
            raise ValueError(f"{path}: record {missing[0]} has no {field!r} field")
        docs = [str(r[field]) for r in records]
    else:
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path}: no text found")
    return docs


def read_hf_documents(name: str, split: str = "train", config: str | None = None,
                      field: str = "text") -> list[str]:
    """Documents of a Hugging Face dataset (requires network or a local datasets cache)."""
    from datasets import load_dataset
    try:
        data = load_dataset(name, config, split=split)
    except Exception as err:  # network, missing cache, unknown name
        raise RuntimeError(
            f"could not load dataset {name!r} ({type(err).__name__}: {err}); offline, pass a local "
            f".txt/.jsonl file instead") from err
    return [str(t) for t in data[field] if str(t).strip()]
