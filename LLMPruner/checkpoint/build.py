"""Build a model around a state dict whose tensors may be smaller than the config says (converters).

The stock model is created on the meta device (nothing allocated), every parameter whose saved shape
differs is swapped for an empty one of the saved shape, the adapter rewrites the config from those
shapes, and the tensors are then assigned in place. No module name is spelled here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from LLMPruner.adapters import get_adapter
from LLMPruner.shrink import sync_module_sizes


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as is: the message names the file or tensor at fault."""


def model_from_state_dict(config, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A stock ``AutoModelForCausalLM`` for ``config`` holding exactly the tensors of ``state_dict``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():  # parameters on meta, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config)
    get_adapter(model).prepare(model)  # e.g. BLOOM's per-head ALiBi slopes, saved as parameters
    for name, param in list(model.named_parameters()):
        saved = state_dict.get(name)
        if saved is not None and tuple(saved.shape) != tuple(param.shape):
            if saved.ndim != param.ndim:
                raise CheckpointError(f"tensor {name!r}: saved shape {tuple(saved.shape)} cannot be "
                                      f"{tuple(param.shape)} pruned")
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr,
                    nn.Parameter(torch.empty(saved.shape, device="meta"), requires_grad=param.requires_grad))
    tied = set(tied_keys(model)) if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted({name for name, _ in model.named_parameters()} - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"state dict does not fit {type(model).__name__}: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    sync_module_sizes(model)
    get_adapter(model).update_config(model)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    assert not leftover, f"parameters never loaded: {leftover[:8]}"
    return model.eval()


def tied_keys(model: nn.Module) -> list[str]:
    """Names of parameters that are copies of others when embeddings are tied (e.g. the LM head)."""
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    keys = getter() if getter is not None else getattr(model, "_tied_weights_keys", None) or {}
    return list(keys)


def stock_shapes(cls, config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the config implies (built on the meta device: no memory)."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        for name in tied_keys(model):
            shapes.pop(name, None)
    return shapes
