"""In memory, across devices: accelerate's big-model placement for the calibration and Taylor passes.

``place_model(model, "auto", max_memory="20GB")`` spreads the decoder layers over every visible GPU
(and the CPU when they are full) with ``infer_auto_device_map`` + ``dispatch_model``; activations hop
from device to device through accelerate's hooks, gradients flow back the same way. Nothing is
parallelised by hand: the devices are used one after the other, which is what fits a model that one
device cannot hold. ``unplace_model`` removes the hooks (before shrinking is saved or evaluated).
"""
from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn

from LLMPruner.stream.memory import parse_memory

logger = logging.getLogger(__name__)


from LLMPruner.options import parse_device_map  # noqa: E402,F401  (re-exported)


def device_budget(max_memory: str | int | None) -> dict | None:
    """``--max_memory`` for every visible GPU (the CPU takes what is left)."""
    if max_memory is None:
        return None
    per_device = parse_memory(max_memory)
    budget: dict = {i: per_device for i in range(torch.cuda.device_count())}
    budget["cpu"] = max(per_device, 1 << 40) if budget else per_device
    return budget


def place_model(model: nn.Module, device_map: str | dict, max_memory: str | int | None = None) -> dict:
    """Dispatch ``model`` over devices; returns the module -> device map used."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential"):
        device_map = {"": device_map}
    elif isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        budget = device_budget(max_memory)
        if device_map != "sequential" and torch.cuda.device_count() > 1:
            budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    logger.info("device map: %s", device_map)
    return device_map


def unplace_model(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Remove accelerate's hooks and gather the model on ``device``."""
    from accelerate.hooks import remove_hook_from_module
    remove_hook_from_module(model, recurse=True)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    return model.to(device)
