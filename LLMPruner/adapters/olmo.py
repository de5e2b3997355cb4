"""OLMo-2 and OLMo-3: LLaMA names with post-norms and q/k RMSNorms over the *whole* projection.

``q_norm`` normalises all of ``q`` at once (``num_heads * head_dim`` wide), ``k_norm`` all of ``k``. Tracing
couples each head's slice of their weights with the head, so they are sliced with it. But the norm's mean
runs over every kept head: with fewer heads the same sum of squares is divided by a smaller width, and the
kept heads' ``q`` (and ``k``) would shrink by ``sqrt(new / old)``, flattening every attention softmax.
``update_config`` therefore multiplies each sliced norm's weight by ``sqrt(old / new)``, which gives the
kept heads their former values (exact, up to the norm's epsilon, when the removed heads' rows were zero). The old
width is the one the config still describes when the weights have just been sliced.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from LLMPruner.structure import LayerShape, ModelStructure
from LLMPruner.adapters.llama import LlamaAdapter


class OlmoAdapter(LlamaAdapter):
    model_types = ("olmo2", "olmo3")

    def update_config(self, model: nn.Module) -> ModelStructure:
        self._rescale_head_norms(model)
        return super().update_config(model)

    def _rescale_head_norms(self, model: nn.Module) -> None:
        config, head_dim = model.config, self.head_dim(model)
        shapes = getattr(config, "layer_shapes", None)
        for i, layer in enumerate(self.decoder_layers(model)):
            before = shapes[i] if shapes else {"num_attention_heads": config.num_attention_heads,
                                               "num_key_value_heads": config.num_key_value_heads}
            attn = layer.self_attn
            for norm, heads in ((attn.q_norm, before["num_attention_heads"]),
                                (attn.k_norm, before["num_key_value_heads"])):
                old, new = heads * head_dim, norm.weight.numel()
                if new != old and not norm.weight.is_meta:
                    with torch.no_grad():
                        norm.weight.mul_(math.sqrt(old / new))

    def resize_layer(self, layer: nn.Module, shape: LayerShape, hidden_size: int, head_dim: int) -> None:
        super().resize_layer(layer, shape, hidden_size, head_dim)
        attn = layer.self_attn
        for name, heads in (("q_norm", shape.num_attention_heads), ("k_norm", shape.num_key_value_heads)):
            old = getattr(attn, name)
            new = type(old)(heads * head_dim, eps=old.variance_epsilon)
            setattr(attn, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
