"""Load any model LLMPruner accepts: a Hugging Face id or folder, a pruned folder, Meta's layout, or
(only when explicitly allowed) the reference's pickled ``pytorch_model.bin``.

``load_pruned`` is the strict, ``from_pretrained``-style loader for folders written by ``save_pruned``:
heterogeneous layers are rebuilt from ``config.layer_shapes`` on the meta device, every weight file is
checked against its recorded SHA-256 and every tensor against the shape the config implies, and any
missing, unexpected or mis-shaped tensor is an error that names it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from LLMPruner.adapters import get_adapter
from LLMPruner.cli import looks_local
from LLMPruner.checkpoint.build import CheckpointError, model_from_state_dict, stock_shapes
from LLMPruner.checkpoint.gguf_in import gguf_file_of, load_gguf
from LLMPruner.checkpoint.legacy import is_legacy_pickle, load_legacy_pickle
from LLMPruner.checkpoint.meta import is_meta_folder, load_meta
from LLMPruner.checkpoint.modeling_pruned import PRUNED_CLASSES
from LLMPruner.checkpoint.multimodal import config_to_prune, text_only_model
from LLMPruner.checkpoint.save import PRUNING_FILE, sha256_file

logger = logging.getLogger(__name__)


def load_model(name_or_path: str | Path, device: str = "cpu", dtype: torch.dtype | str = "auto", *,
               allow_pickle: bool = False, text_only: bool = False):
    """``(model, tokenizer)`` from a Hugging Face id, a (pruned) Hugging Face folder, a folder in
    Meta's layout, a ``.gguf`` file (or a folder holding one), or, with ``allow_pickle=True`` only, a
    reference LLM-Pruner pickle. An image-text checkpoint (Gemma-3 4B+, Mistral Small 3.x) needs
    ``text_only=True``: its language model alone, as a text model (``multimodal.py``). ``dtype`` is a
    ``torch.dtype``, ``"auto"`` or a name (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    dtype = as_dtype(dtype)
    path = Path(name_or_path)
    gguf_file = gguf_file_of(path)
    if gguf_file is not None:
        model, tokenizer = load_gguf(gguf_file, dtype=dtype)
    elif path.is_dir() and (path / "config.json").is_file() and _image_text(path, text_only):
        model, tokenizer = _load_text_only(path, dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = load_pruned(path, torch_dtype=dtype)
    elif path.is_dir() and is_meta_folder(path):
        model, tokenizer = load_meta(path, dtype=dtype)
    elif is_legacy_pickle(path):
        model, tokenizer = load_legacy_pickle(path, allow_pickle=allow_pickle, dtype=dtype)
    elif path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder; expected config.json (Hugging Face or "
                              "LLMPruner), params.json + consolidated.*.pth (Meta), or pytorch_model.bin "
                              f"(reference pickle); found {sorted(p.name for p in path.iterdir())[:10]}")
    elif path.exists() or looks_local(str(name_or_path)):
        raise FileNotFoundError(f"model {str(name_or_path)!r}: no such checkpoint folder")
    elif _image_text(str(name_or_path), text_only):  # a Hugging Face Hub id from here on
        model, tokenizer = _load_text_only(str(name_or_path), dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    return model.to(device).eval(), tokenizer


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``dtype`` as every loader takes it: a ``torch.dtype`` for a name such as ``"float32"`` (the scripts'
    ``--dtype``), ``"auto"`` and ``None`` unchanged."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: not a floating-point dtype; use float32, bfloat16, float16 or auto")
    return found


def _image_text(source: str | Path, text_only: bool) -> bool:
    """Whether ``source`` is an image-text checkpoint to load as its language model (an error naming
    ``--text_only`` if it is one and ``text_only`` is off)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(source))
    text = config_to_prune(config, text_only, str(source))
    if text is config:
        return False
    get_adapter(text)  # an unsupported language model fails before the image-text model is loaded
    return True


def _load_text_only(source: str | Path, dtype):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    model = text_only_model(AutoModelForImageTextToText.from_pretrained(str(source), dtype=dtype))
    local = Path(source).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source)) if not local or has_tokenizer(Path(source)) else None
    return model, tokenizer


def load_pruned(folder: str | Path, device_map: str | dict | None = None,
                torch_dtype: torch.dtype | str | None = None, *, verify_checksums: bool = True,
                **from_pretrained_kwargs):
    """``(model, tokenizer)`` from a folder written by ``save_pruned`` (or any Hugging Face folder).

    ``device_map`` and ``torch_dtype`` mean what they mean in ``from_pretrained`` (``"auto"`` works);
    the unpruned model is never allocated. Other keyword arguments (e.g. ``attn_implementation``) go
    to ``from_pretrained``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pruned checkpoint {str(folder)!r}: no such folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json, so not a complete checkpoint (an interrupted "
                              "save leaves exactly this)")
    config = AutoConfig.from_pretrained(folder)
    get_adapter(config)  # an unsupported architecture fails here, listing the supported ones
    record = _read_record(folder)
    if verify_checksums and record:
        _verify_checksums(folder, record)
    heterogeneous = bool(getattr(config, "layer_shapes", None))
    if (record or {}).get("loader") == "llmpruner" or (heterogeneous and config.model_type not in PRUNED_CLASSES):
        model = _load_generic(folder, config, device_map, torch_dtype, record)
        tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
        return model, tokenizer
    cls = PRUNED_CLASSES[config.model_type] if heterogeneous else AutoModelForCausalLM
    if not _renamed_on_save(config.model_type):
        _check_tensors(folder, stock_shapes(cls, config))
    model, info = cls.from_pretrained(folder, config=config, device_map=device_map,
                                      dtype=torch_dtype if torch_dtype is not None else "auto",
                                      output_loading_info=True, **from_pretrained_kwargs)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise CheckpointError(f"{folder}: weights do not match the config: {problems}")
    get_adapter(model).prepare(model)  # state the stock class does not restore (ALiBi slopes, scales)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    logger.info("loaded %s from %s (%s)", type(model).__name__, folder,
                "heterogeneous layers" if heterogeneous else "uniform layers")
    return model.eval(), tokenizer


def _load_generic(folder: Path, config, device_map, torch_dtype, record: dict | None):
    """Per-layer shapes of an architecture with no remote-code class: build empty, swap shapes, assign."""
    from safetensors.torch import load_file
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model*.safetensors file")
    state_dict = {}
    for f in files:
        state_dict.update(load_file(f))
    model = model_from_state_dict(config, state_dict)
    found = get_adapter(model).read_structure(model).to_dict()
    expected = (record or {}).get("structure")
    if expected is not None and found != expected:
        raise CheckpointError(f"{folder}: the structure in {PRUNING_FILE} {expected} disagrees with the "
                              f"weights {found}")
    if torch_dtype not in (None, "auto"):
        model = model.to(getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype)
    if device_map is not None:
        device = device_map if isinstance(device_map, str) and device_map != "auto" else \
            ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
    get_adapter(model).prepare(model)
    logger.info("loaded %s from %s (heterogeneous layers, LLMPruner loader)", type(model).__name__, folder)
    return model.eval()


def _read_record(folder: Path) -> dict | None:
    path = folder / PRUNING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _verify_checksums(folder: Path, record: dict) -> None:
    for name, digest in record.get("sha256", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: weight file listed in {PRUNING_FILE} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: SHA-256 differs from the one recorded at save time: the file is "
                                  "truncated, corrupted or was modified (pass verify_checksums=False to skip)")


def _renamed_on_save(model_type: str) -> bool:
    """Whether transformers writes this type's weights under other names than the model's own (MoE experts:
    fused ``[E, ...]`` in memory, one tensor per expert on disk): its loader converts them, and checks them."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # older transformers: names on disk are the model's
        return False
    return bool(get_checkpoint_conversion_mapping(model_type))


def _check_tensors(folder: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare the safetensors headers with ``expected``; every disagreement is named."""
    from safetensors import SafetensorError, safe_open
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        return  # e.g. a plain Hugging Face folder with .bin weights: transformers checks those
    found: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    found[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}); truncated or corrupted?") \
                from err
    mismatched = [f"{k}: saved {found[k]}, config implies {expected[k]}"
                  for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if mismatched or missing or unexpected:
        raise CheckpointError(f"{folder}: the weights disagree with config.json: mis-shaped {mismatched[:5]}, "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


__all__ = ["load_model", "load_pruned"]
