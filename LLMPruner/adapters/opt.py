"""OPT: ``model.model.decoder.layers[i]`` with ``self_attn.{q,k,v,out}_proj`` and ``fc1``/``fc2``, biases
everywhere, LayerNorm with bias, learned absolute positions (an embedding whose rows are positions: tracing
marks its rows unprunable and joins its columns with the hidden channels, like the token embedding).

What tracing cannot know: the attention reads its head count from ``self.num_heads``; OPT's config has
no ``head_dim`` (the stock model derives it as hidden/heads), so only head-preserving, uniform prunings
(MLP channels in every layer, or layer-wise) reload with a plain ``from_pretrained``.
"""
from __future__ import annotations

import torch.nn as nn

from LLMPruner.structure import LayerShape, ModelStructure
from LLMPruner.adapters.base import Adapter, constructible_heads


class OptAdapter(Adapter):
    model_types = ("opt",)
    module_kinds = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                    "out_proj": "attention", "fc1": "mlp", "fc2": "mlp"}
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def keep_decoder_layers(self, model: nn.Module, keep: list[int]) -> None:
        decoder = model.model.decoder
        decoder.layers = nn.ModuleList([decoder.layers[i] for i in keep])
        for new_idx, layer in enumerate(decoder.layers):
            layer.self_attn.layer_idx = new_idx
        model.config.num_hidden_layers = len(keep)

    def read_structure(self, model: nn.Module) -> ModelStructure:
        layers = self.decoder_layers(model)
        # after pruning the hidden size, hidden/heads no longer gives head_dim: the config records it
        head_dim = getattr(model.config, "head_dim", None) or layers[0].self_attn.head_dim
        hidden = model.model.decoder.embed_positions.weight.shape[1]
        shapes = []
        for layer in layers:
            heads = layer.self_attn.out_proj.weight.shape[1] // head_dim
            shapes.append(LayerShape(num_attention_heads=heads, num_key_value_heads=heads,
                                     intermediate_size=layer.fc2.weight.shape[1]))
        return ModelStructure(hidden_size=hidden, head_dim=head_dim, layers=shapes)

    def update_config(self, model: nn.Module) -> ModelStructure:
        structure = self.read_structure(model)
        config = model.config
        config.hidden_size = structure.hidden_size
        config.word_embed_proj_dim = model.get_input_embeddings().weight.shape[1]
        config.num_hidden_layers = structure.num_hidden_layers
        heads = max(s.num_attention_heads for s in structure.layers)
        # the stock OPT builds only hidden % heads == 0: otherwise a placeholder + layer_shapes
        config.num_attention_heads = constructible_heads(structure.hidden_size, heads, heads)[0]
        config.ffn_dim = max(s.intermediate_size for s in structure.layers)
        config.head_dim = structure.head_dim  # informative: the stock OPT derives it as hidden/heads
        if structure.is_uniform() and heads * structure.head_dim == structure.hidden_size:
            if hasattr(config, "layer_shapes"):
                del config.layer_shapes
        else:
            config.layer_shapes = [vars(s).copy() for s in structure.layers]
        for layer, s in zip(self.decoder_layers(model), structure.layers):
            self._update_layer(layer, s, structure.hidden_size)
            layer.self_attn.head_dim = structure.head_dim
            layer.self_attn.scaling = structure.head_dim ** -0.5
        return structure

    def _update_layer(self, layer: nn.Module, shape: LayerShape, hidden_size: int) -> None:
        attn = layer.self_attn
        attn.num_heads = shape.num_attention_heads
        attn.embed_dim = layer.embed_dim = hidden_size

    def resize_layer(self, layer: nn.Module, shape: LayerShape, hidden_size: int, head_dim: int) -> None:
        attn, q = layer.self_attn, shape.num_attention_heads * head_dim
        for parent, name, fan_in, fan_out in ((attn, "q_proj", hidden_size, q), (attn, "k_proj", hidden_size, q),
                                              (attn, "v_proj", hidden_size, q), (attn, "out_proj", q, hidden_size),
                                              (layer, "fc1", hidden_size, shape.intermediate_size),
                                              (layer, "fc2", shape.intermediate_size, hidden_size)):
            old = getattr(parent, name)
            setattr(parent, name, nn.Linear(fan_in, fan_out, bias=old.bias is not None,
                                            device=old.weight.device, dtype=old.weight.dtype))
        attn.head_dim = head_dim
        self._update_layer(layer, shape, hidden_size)
