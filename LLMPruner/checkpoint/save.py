"""Save a (pruned) model as a folder any transformers user can load: safetensors, config, tokenizer.

Uniform models (every layer the same shape) are plain checkpoints of the original architecture.
Heterogeneous ones also get ``modeling_pruned.py`` and an ``auto_map`` so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` rebuilds them.
``pruning.json`` records the structure, provenance and a SHA-256 of every weight file.

Saving is atomic: everything is written into a hidden temporary folder, then moved in with
``config.json`` last (and the previous ``config.json`` removed first), so an interrupted save leaves
either the previous checkpoint or a folder without ``config.json``, which nothing loads.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from LLMPruner import __version__
from LLMPruner.adapters import get_adapter
from LLMPruner.checkpoint import modeling_pruned
from LLMPruner.checkpoint.build import stock_shapes, tied_keys

logger = logging.getLogger(__name__)

PRUNING_FILE = "pruning.json"
MODELING_FILE = "modeling_pruned.py"
FORMAT_VERSION = 1
TMP_PREFIX = ".llmpruner-save-"


def save_pruned(model: nn.Module, tokenizer, folder: str | Path, provenance: dict | None = None, *,
                max_shard_size: str | int = "5GB", round_to: int | None = None,
                weights_writer: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` to ``folder`` atomically; returns the folder.

    ``provenance`` (base model, flags, parameter counts, ...) is stored in ``pruning.json`` as given.
    ``round_to`` is only recorded: rounding happens when the pruning plan is selected (``LLMPruner.select.units``),
    which also warns about the pruned layers it could not round (the saver cannot tell a pruned layer from
    one that was left alone, whose width need not be a multiple).
    ``weights_writer(tmp)``, when given, writes the ``model*.safetensors`` files instead of
    ``save_pretrained`` (the layer-streamed path: ``model`` is then a meta-device skeleton of the right
    shapes and only its config and generation config are written from it).
    """
    folder = Path(folder)
    adapter = get_adapter(model)
    structure = adapter.update_config(model)  # the config always describes the weights being written
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to={round_to}: must be a positive integer (e.g. 8 or 64)")
    model_type = model.config.model_type
    remote = model_type in modeling_pruned.PRUNED_CLASSES
    if getattr(model.config, "layer_shapes", None) and not remote:
        logger.warning("model_type=%r with per-layer shapes: the folder loads with LLMPruner.load_pruned "
                       "(no remote-code class exists for it)", model_type)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=folder))
    try:
        if weights_writer is None:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        else:
            _save_configs(model, tmp)
            weights_writer(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        # layer_shapes: layers differ, or their head count is not one a stock config can hold
        _set_loading_route(config, model_type, heterogeneous=bool(config.get("layer_shapes")), tmp=tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_record(tmp, parameters=sum(p.numel() for p in model.parameters()), provenance=provenance,
                     loader="transformers" if _stock_rebuilds(model) else "llmpruner",
                     structure=structure.to_dict(), round_to=round_to)
        _commit(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s checkpoint to %s (%d layers, %s)", model_type, folder, structure.num_hidden_layers,
                "per-layer shapes, loads with trust_remote_code=True or load_pruned"
                if getattr(model.config, "layer_shapes", None) else "stock config")
    return folder


def _save_configs(model: nn.Module, tmp: Path) -> None:
    """What ``save_pretrained`` writes besides the weights."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if model.can_generate():
        model.generation_config.save_pretrained(tmp)


def _set_loading_route(config: dict, model_type: str, heterogeneous: bool, tmp: Path) -> None:
    """Stock class for uniform models; the copied modeling file + ``auto_map`` for heterogeneous ones."""
    config.pop("auto_map", None)
    pruned_cls = modeling_pruned.PRUNED_CLASSES.get(model_type)
    if pruned_cls is not None:
        config["architectures"] = [pruned_cls.__mro__[1].__name__]  # the stock class
    if heterogeneous and pruned_cls is not None:
        config["architectures"] = [pruned_cls.__name__]
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{pruned_cls.__name__}"}
        shutil.copyfile(modeling_pruned.__file__, tmp / MODELING_FILE)


def _commit(tmp: Path, folder: Path) -> None:
    """Move the finished files from ``tmp`` into ``folder``, ``config.json`` last."""
    (folder / "config.json").unlink(missing_ok=True)  # from here on the old checkpoint is gone
    new = {p.name for p in tmp.iterdir()}
    for old in list(folder.glob("model*.safetensors*")) + [folder / MODELING_FILE]:
        if old.name not in new:
            old.unlink(missing_ok=True)  # shards of a previous save that this one does not have
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        _fsync(path)
        os.chmod(path, 0o666 & ~umask)  # some writers create 0600 temporary files
        os.replace(path, folder / path.name)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(folder: Path, *, parameters: int, provenance: dict | None, loader: str,
                 structure: dict | None = None, round_to: int | None = None) -> None:
    """``folder/pruning.json``: versions, the parameter count, the structure, SHA-256 of every weight file
    (``load_pruned`` verifies them), the provenance, and which loader rebuilds the model."""
    weights = sorted(p.name for p in folder.glob("model*.safetensors"))
    record = {"format": "llmpruner-checkpoint", "format_version": FORMAT_VERSION,
              "llmpruner_version": __version__, "transformers_version": _transformers_version(),
              "torch_version": torch.__version__, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "parameters": parameters, "round_to": round_to, "structure": structure,
              "sha256": {name: sha256_file(folder / name) for name in weights},
              "provenance": _jsonable(provenance or {}), "loader": loader}
    (folder / PRUNING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _stock_rebuilds(model: nn.Module) -> bool:
    """Whether the stock class (or the copied modeling file) rebuilds every tensor shape from the config."""
    if model.config.model_type in modeling_pruned.PRUNED_CLASSES:
        return True
    from transformers import AutoModelForCausalLM
    expected = stock_shapes(AutoModelForCausalLM, copy.deepcopy(model.config))
    tied = set(tied_keys(model)) if getattr(model.config, "tie_word_embeddings", False) else set()
    saved = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
    # every tensor known to the stock class (e.g. not BLOOM's per-layer ALiBi slopes) and of its shape
    return all(expected.get(name) == shape for name, shape in saved.items())
