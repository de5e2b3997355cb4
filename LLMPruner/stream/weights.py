"""Weights that stay where they are: a model skeleton on the meta device, filled one module at a time.

``skeleton(config)`` builds the stock model with every parameter on the meta device (buffers such as the
rotary ``inv_freq`` are real: they are computed from the config). A ``WeightSource`` hands out single
tensors by name: ``SafetensorsSource`` reads them from a checkpoint folder's memory-mapped safetensors
files, ``StateDictSource`` from a CPU copy (an in-memory model, e.g. one dequantised from GGUF).
``load_module`` materialises a submodule's parameters on a device; ``release_module`` puts them back on
the meta device (keeping their, possibly pruned, shapes). Tied parameters (an LM head sharing the
embedding) are loaded once and assigned to every owner, as in the in-memory model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


class WeightSource:
    """Tensors by parameter name (the names of the stock model's ``named_parameters``)."""

    def keys(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(WeightSource):
    """The ``model*.safetensors`` files of a Hugging Face folder, read tensor by tensor.

    Each tensor is read with ``readinto`` at its offset (the safetensors header gives it) into a fresh
    tensor, not memory-mapped: pages of a mapping stay in the process's resident set for as long as
    the mapping lives, which would make host memory grow to the whole checkpoint."""

    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"--offload: {self.folder} has no model*.safetensors file to stream from")
        self._where: dict[str, tuple[Path, int, str, list[int], int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    self._where[name] = (f, 8 + size + start, info["dtype"], info["shape"], end - start)

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        path, offset, dtype, shape, nbytes = self._where[name]
        if dtype not in self._DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which streaming does not read")
        t = torch.empty(shape, dtype=self._DTYPES[dtype])
        buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
        assert buf is None or buf.nbytes == nbytes, (name, buf.nbytes, nbytes)
        if buf is not None:
            with open(path, "rb") as fh:
                fh.seek(offset)
                got = fh.readinto(memoryview(buf))
            assert got == nbytes, f"{path}: {name!r} truncated ({got} of {nbytes} bytes)"
        return t


class StateDictSource(WeightSource):
    """A CPU copy of the weights (``{name: tensor}``); costs host memory, never device memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    @classmethod
    def of(cls, model: nn.Module) -> "StateDictSource":
        return cls({n: p.detach().cpu() for n, p in model.named_parameters()})

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()  # a pass edits loaded weights in place: never the caller's model


def is_safetensors_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def skeleton(config) -> nn.Module:
    """The stock causal LM of ``config`` with parameters on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    if getattr(config, "layer_shapes", None):
        raise ValueError("--offload: the model has per-layer shapes (an already block-wise pruned "
                         "checkpoint); streaming supports uniform models only, prune it without --offload")
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one Parameter for the embedding and the head, as in a loaded model
    return model.eval()


def skeleton_from_folder(folder: str | Path) -> nn.Module:
    from transformers import AutoConfig
    return skeleton(AutoConfig.from_pretrained(folder))


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{canonical name: every name of that parameter}`` (tied parameters have several)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values()}


class Part:
    """A set of parameters loaded and released together: one decoder layer, or everything outside the
    decoder layers (embeddings, final norm, head)."""

    def __init__(self, model: nn.Module, layers_prefix: str, layer: int | None) -> None:
        self.model, self.layer = model, layer
        inside = (lambda n: n.startswith(f"{layers_prefix}.{layer}.")) if layer is not None else \
            (lambda n: not n.startswith(layers_prefix + "."))
        self.groups = [g for g in aliases(model).values() if any(inside(n) for n in g)]
        self.names = [g[0] for g in self.groups]
        self.name = f"layer {layer}" if layer is not None else "embeddings/head"

    def load(self, source: WeightSource, device: torch.device | str, dtype: torch.dtype | None = None) -> int:
        """Materialise the (meta) parameters from ``source`` on ``device``; returns the bytes loaded."""
        available = source.keys()
        loaded = 0
        for group in self.groups:
            if not self.model.get_parameter(group[0]).is_meta:
                continue
            found = next((n for n in group if n in available), None)
            if found is None:
                raise KeyError(f"the weights have none of {group} (a checkpoint that does not fit its config?)")
            t = source.get(found)
            t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            _assign(self.model, group, nn.Parameter(t, requires_grad=False))
            loaded += t.numel() * t.element_size()
        return loaded

    def release(self) -> None:
        """Back to the meta device, keeping the (possibly pruned) shapes."""
        for group in self.groups:
            p = self.model.get_parameter(group[0])
            if not p.is_meta:
                _assign(self.model, group, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                        requires_grad=False))

    def params(self) -> dict[str, nn.Parameter]:
        return {g[0]: self.model.get_parameter(g[0]) for g in self.groups}


def _assign(model: nn.Module, names: list[str], param: nn.Parameter) -> None:
    for name in names:
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, param)


def layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    """``"model.layers"``: the name of the decoder-layer list (found, never spelled)."""
    return next(n for n, m in model.named_modules() if m is layers)
