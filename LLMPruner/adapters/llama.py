"""LLaMA-style decoders: LLaMA 1/2/3, Vicuna, TinyLlama, Mistral, Qwen2 (q/k/v biases).

All share ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..structure import LayerShape, ModelStructure
from .base import Adapter


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    module_kinds = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                    "o_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    bias_flags = {"attention": "attention_bias", "mlp": "mlp_bias"}

    def enable_biases(self, model: nn.Module, kind) -> None:
        flag = self.bias_flags[kind]
        if not hasattr(model.config, flag):
            raise ValueError(f"--compensation bias: model_type {model.config.model_type!r} has no {flag} "
                             f"config flag, so added biases would not load; use --compensation refit")
        setattr(model.config, flag, True)
        for layer in self.decoder_layers(model):
            for name, module in layer.named_modules():
                if self.kind_of(name) == kind and isinstance(module, nn.Linear) and module.bias is None:
                    w = module.weight
                    module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def keep_decoder_layers(self, model: nn.Module, keep: list[int]) -> None:
        old = model.model.layers
        model.model.layers = nn.ModuleList([old[i] for i in keep])
        for new_idx, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new_idx
        config = model.config
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in keep]
        config.num_hidden_layers = len(keep)

    def read_structure(self, model: nn.Module) -> ModelStructure:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        hidden = model.get_input_embeddings().weight.shape[1]
        shapes = []
        for layer in self.decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            shapes.append(LayerShape(num_attention_heads=attn.q_proj.weight.shape[0] // head_dim,
                                     num_key_value_heads=attn.k_proj.weight.shape[0] // head_dim,
                                     intermediate_size=mlp.gate_proj.weight.shape[0]))
        return ModelStructure(hidden_size=hidden, head_dim=head_dim, layers=shapes)

    def update_config(self, model: nn.Module) -> ModelStructure:
        structure = self.read_structure(model)
        config = model.config
        config.head_dim = structure.head_dim  # explicit: hidden/heads no longer gives it
        config.hidden_size = structure.hidden_size
        config.num_hidden_layers = structure.num_hidden_layers
        layers = structure.layers
        config.num_attention_heads = max(s.num_attention_heads for s in layers)
        config.num_key_value_heads = max(s.num_key_value_heads for s in layers)
        config.intermediate_size = max(s.intermediate_size for s in layers)
        if structure.is_uniform():
            if hasattr(config, "layer_shapes"):
                del config.layer_shapes
        else:
            config.layer_shapes = [vars(s).copy() for s in layers]
        for layer, s in zip(self.decoder_layers(model), layers):
            assert s.num_attention_heads % s.num_key_value_heads == 0, s
            layer.self_attn.num_key_value_groups = s.num_attention_heads // s.num_key_value_heads
            layer.mlp.intermediate_size = s.intermediate_size
            layer.mlp.hidden_size = structure.hidden_size
        return structure

    def resize_layer(self, layer: nn.Module, shape: LayerShape, hidden_size: int, head_dim: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
        inter = shape.intermediate_size
        for parent, name, fan_in, fan_out in ((attn, "q_proj", hidden_size, q), (attn, "k_proj", hidden_size, kv),
                                              (attn, "v_proj", hidden_size, kv), (attn, "o_proj", q, hidden_size),
                                              (mlp, "gate_proj", hidden_size, inter),
                                              (mlp, "up_proj", hidden_size, inter),
                                              (mlp, "down_proj", inter, hidden_size)):
            old = getattr(parent, name)
            new = nn.Linear(fan_in, fan_out, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            setattr(parent, name, new)
        attn.num_key_value_groups = shape.num_attention_heads // shape.num_key_value_heads
