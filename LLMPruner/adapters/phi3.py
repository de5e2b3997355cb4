"""Phi-3: fused ``qkv_proj`` (rows ``[q; k; v]``) and ``gate_up_proj`` (rows ``[gate; up]``).

Tracing replays the model's own slicing of the fused outputs on the channel ids, so a KV group's unit
holds its query rows, its key rows and its value rows of the one fused weight. What tracing cannot know:
the forward finds the q/k split point from ``self.config.num_attention_heads`` and
``self.num_key_value_heads``, so each layer gets its own head counts (a per-layer view of the config).
"""
from __future__ import annotations

import torch.nn as nn

from LLMPruner.structure import LayerShape
from LLMPruner.adapters.llama import LlamaAdapter, Projection


class LayerConfig:
    """The model config as seen by one decoder layer: every field delegated, a few overridden."""

    def __init__(self, base, **overrides) -> None:
        while isinstance(base, LayerConfig):
            base = object.__getattribute__(base, "_base")
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)


class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)
    module_kinds = {"qkv_proj": "attention", "o_proj": "attention", "gate_up_proj": "mlp", "down_proj": "mlp"}
    lora_target_modules = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def kv_heads(self, layer: nn.Module, heads: int, head_dim: int) -> int:
        rows = layer.self_attn.qkv_proj.weight.shape[0]  # (heads + 2 kv) * head_dim
        return (rows // head_dim - heads) // 2

    def update_layer(self, layer: nn.Module, shape: LayerShape, config) -> None:
        super().update_layer(layer, shape, config)
        attn = layer.self_attn
        attn.num_key_value_heads = shape.num_key_value_heads
        attn.config = LayerConfig(attn.config, num_attention_heads=shape.num_attention_heads,
                                  num_key_value_heads=shape.num_key_value_heads)

    def projections(self, layer: nn.Module, shape: LayerShape, hidden: int, head_dim: int) -> list[Projection]:
        attn, mlp = layer.self_attn, layer.mlp
        q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
        inter = shape.intermediate_size
        return [(attn, "qkv_proj", hidden, q + 2 * kv), (attn, "o_proj", q, hidden),
                (mlp, "gate_up_proj", hidden, 2 * inter), (mlp, "down_proj", inter, hidden)]
