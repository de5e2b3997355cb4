"""The adapter interface: what tracing cannot know about an architecture."""
from __future__ import annotations

from typing import Literal

import torch.nn as nn

from LLMPruner.structure import ModelStructure

GroupKind = Literal["attention", "mlp", "hidden"]


def constructible_heads(hidden_size: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """Head counts that a stock config accepts and a stock constructor builds.

    transformers 5 validates ``hidden_size % num_attention_heads == 0`` (LLaMA, Gemma-2) and OPT/BLOOM
    refuse other counts when they build their attention, even when ``head_dim`` is explicit; GQA needs
    ``heads % kv_heads == 0``. A pruned model easily breaks this (hidden 64, 8 -> 6 heads; 32 -> 24 heads
    at 4096). Returns ``(heads, kv_heads)`` when they qualify, else the largest pair not above them that
    does, e.g. ``(64, 6, 3) -> (4, 2)``: placeholders for construction only, the real per-layer counts
    then live in ``config.layer_shapes`` and every layer is resized to them when loading.
    """
    for h in range(heads, 0, -1):
        if hidden_size % h:
            continue
        for kv in range(min(kv_heads, h), 0, -1):
            if h % kv == 0:
                return h, kv
    raise AssertionError("unreachable: (1, 1) always qualifies")


class UnsupportedArchitectureError(ValueError):
    """A model type (or a variant of one) that no adapter prunes; the message lists what is supported."""


class Adapter:
    """Base adapter. Subclasses declare module names; the generic code never spells one."""

    model_types: tuple[str, ...] = ()
    #: short module name -> the kind of group its output/input channels belong to
    module_kinds: dict[str, GroupKind] = {}
    #: every linear projection of a decoder layer (the default LoRA targets)
    lora_target_modules: tuple[str, ...] = ()
    #: mixture-of-experts models: only whole experts are removed (``LLMPruner/experts/core.py``)
    experts_only: bool = False

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def check_width_pruning(self, config) -> None:
        """Refuse pruning heads, channels, the hidden size or layers of a model this adapter only prunes
        by whole experts, naming the flag that does."""
        if self.experts_only:
            raise UnsupportedArchitectureError(
                f"model_type {getattr(config, 'model_type', None)!r} is a mixture of experts: LLMPruner removes its "
                "whole experts (hf_prune.py --prune_experts N, with --expert_importance reap); pruning its heads, "
                "channels, hidden size or layers (--block_wise, --channel_wise, --layer_wise, --prune_layers, "
                "--param_budget) is not supported")

    def check_config(self, config) -> None:
        """Refuse a config whose variant this adapter cannot prune (``UnsupportedArchitectureError``
        naming the option); called by ``get_adapter``, before any weight is read."""

    def prepare(self, model: nn.Module) -> None:
        """Install what the stock model lacks (e.g. BLOOM's per-head ALiBi slopes as parameters, so that
        tracing couples them with their heads). Idempotent; called by ``discover`` and after loading a
        pruned checkpoint (the state it restores is kept in ``model.config``)."""

    def keep_decoder_layers(self, model: nn.Module, keep: list[int]) -> None:
        """Keep only the decoder layers at indices ``keep`` (in order), renumbering caches and config."""
        raise NotImplementedError

    def read_structure(self, model: nn.Module) -> ModelStructure:
        """Per-layer shapes read from the weights themselves."""
        raise NotImplementedError

    def update_config(self, model: nn.Module) -> ModelStructure:
        """Write the shapes found in the weights back into ``model.config`` and module attributes."""
        raise NotImplementedError

    def resize_layer(self, layer: nn.Module, shape, hidden_size: int, head_dim: int) -> None:
        """Replace a decoder layer's projections by empty ones of the given shape (for loading)."""
        raise NotImplementedError

    def enable_biases(self, model: nn.Module, kind: GroupKind) -> None:
        """Give every projection of ``kind`` a (zero) bias and set the config flag that makes them load."""
        raise NotImplementedError(f"{type(self).__name__} cannot add biases")

    def kind_of(self, param_name: str) -> GroupKind | None:
        parts = param_name.split(".")
        for part in reversed(parts):
            if part in self.module_kinds:
                return self.module_kinds[part]
        return None
