"""BLOOM: ``model.transformer.h[i]`` with a fused ``self_attention.query_key_value`` whose rows are
interleaved per head (``[heads, 3, head_dim]``), ``dense``, ``mlp.dense_h_to_4h``/``dense_4h_to_h``,
LayerNorms with bias (also right after the embedding), and ALiBi instead of rotary positions.

Tracing finds the per-head interleaving by itself (the forward's own ``view(B, T, heads, 3, head_dim)``
is replayed on the channel ids). What it cannot know: the stock model builds one ALiBi tensor for all
layers from ``config.n_head``, giving head ``h`` the slope ``slope(h, n_head)``. A pruned layer must keep
the slopes of the heads it kept, so ``prepare`` gives every attention layer its slopes as a (frozen)
parameter ``alibi_slopes`` [heads] and rebuilds the layer's ALiBi from it in a forward pre-hook. Because
the slopes enter the traced forward, discovery puts slope ``h`` in head ``h``'s group and shrinking slices
them together; ``config.alibi_slopes`` keeps them for reloading.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from LLMPruner.structure import LayerShape, ModelStructure
from LLMPruner.adapters.base import Adapter, constructible_heads


def _alibi_pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Replace the model-wide ALiBi ``[B * n_head, 1, T]`` by this layer's ``[B * heads, 1, T]``."""
    alibi, slopes = kwargs["alibi"], block.self_attention.alibi_slopes  # slopes: [heads]
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[0], alibi.shape[-1]
    mask = kwargs.get("attention_mask")  # additive [B, 1, Tq, T] (0 where seen) or None
    if mask is None:
        pos = torch.arange(length, device=alibi.device)[None, :].expand(batch, length)
    else:
        seen = mask[:, 0, -1, :] if mask.dtype == torch.bool else mask[:, 0, -1, :] == 0
        seen = seen.long()  # the last query sees every non-padding key: the 2-D padding mask
        pos = (seen.cumsum(-1) - 1) * seen  # as ``build_alibi_tensor`` computes positions
    assert pos.shape == (batch, length), (pos.shape, alibi.shape)
    alibi = (slopes[None, :, None] * pos[:, None, :]).reshape(batch * slopes.shape[0], 1, length)
    kwargs["alibi"] = alibi.to(hidden.dtype)
    return args, kwargs


class BloomAdapter(Adapter):
    model_types = ("bloom",)
    module_kinds = {"query_key_value": "attention", "dense": "attention", "alibi_slopes": "attention",
                    "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
    lora_target_modules = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def prepare(self, model: nn.Module) -> None:
        saved = getattr(model.config, "alibi_slopes", None)
        for i, block in enumerate(self.decoder_layers(model)):
            attn = block.self_attention
            if not isinstance(getattr(attn, "alibi_slopes", None), nn.Parameter):
                weight = attn.query_key_value.weight
                slopes = (torch.tensor(saved[i], dtype=torch.float32) if saved is not None
                          else _get_alibi_slopes(model.config.n_head, weight.device))
                attn.alibi_slopes = nn.Parameter(slopes.to(weight.device), requires_grad=False)
            if getattr(block, "_alibi_hook", None) is None:
                block._alibi_hook = block.register_forward_pre_hook(_alibi_pre_hook, with_kwargs=True)

    def keep_decoder_layers(self, model: nn.Module, keep: list[int]) -> None:
        transformer, config = model.transformer, model.config
        transformer.h = nn.ModuleList([transformer.h[i] for i in keep])
        for new_idx, block in enumerate(transformer.h):
            block.self_attention.layer_idx = new_idx
        if getattr(config, "alibi_slopes", None) is not None:
            config.alibi_slopes = [config.alibi_slopes[i] for i in keep]
        config.n_layer = len(keep)

    def read_structure(self, model: nn.Module) -> ModelStructure:
        blocks = self.decoder_layers(model)
        # after pruning the hidden size, hidden/heads no longer gives head_dim: the config records it
        head_dim = getattr(model.config, "head_dim", None) or blocks[0].self_attention.head_dim
        shapes = []
        for block in blocks:
            heads = block.self_attention.dense.weight.shape[1] // head_dim
            shapes.append(LayerShape(num_attention_heads=heads, num_key_value_heads=heads,
                                     intermediate_size=block.mlp.dense_4h_to_h.weight.shape[1]))
        hidden = model.get_input_embeddings().weight.shape[1]
        return ModelStructure(hidden_size=hidden, head_dim=head_dim, layers=shapes)

    def update_config(self, model: nn.Module) -> ModelStructure:
        structure = self.read_structure(model)
        config, layers = model.config, structure.layers
        config.hidden_size = structure.hidden_size
        config.n_layer = structure.num_hidden_layers
        # the stock BLOOM builds only hidden % n_head == 0: otherwise a placeholder + layer_shapes
        heads = max(s.num_attention_heads for s in layers)
        config.n_head = constructible_heads(structure.hidden_size, heads, heads)[0]
        config.head_dim = structure.head_dim  # informative: the stock BLOOM derives hidden/heads, MLP 4*hidden
        stock = all(s.num_attention_heads * structure.head_dim == structure.hidden_size
                    and s.intermediate_size == 4 * structure.hidden_size for s in layers)
        if structure.is_uniform() and stock:
            if hasattr(config, "layer_shapes"):
                del config.layer_shapes
        else:
            config.layer_shapes = [vars(s).copy() for s in layers]
        blocks = self.decoder_layers(model)
        for block, s in zip(blocks, layers):
            block.num_heads = block.self_attention.num_heads = s.num_attention_heads
            block.self_attention.head_dim = structure.head_dim
            block.self_attention.inv_norm_factor = structure.head_dim ** -0.5
            block.self_attention.hidden_size = block.self_attention.split_size = structure.hidden_size
        if all(isinstance(getattr(b.self_attention, "alibi_slopes", None), nn.Parameter) for b in blocks):
            config.alibi_slopes = [b.self_attention.alibi_slopes.tolist() for b in blocks]
        return structure

    def resize_layer(self, layer: nn.Module, shape: LayerShape, hidden_size: int, head_dim: int) -> None:
        attn, mlp, q = layer.self_attention, layer.mlp, shape.num_attention_heads * head_dim
        for parent, name, fan_in, fan_out in ((attn, "query_key_value", hidden_size, 3 * q),
                                              (attn, "dense", q, hidden_size),
                                              (mlp, "dense_h_to_4h", hidden_size, shape.intermediate_size),
                                              (mlp, "dense_4h_to_h", shape.intermediate_size, hidden_size)):
            old = getattr(parent, name)
            setattr(parent, name, nn.Linear(fan_in, fan_out, bias=old.bias is not None,
                                            device=old.weight.device, dtype=old.weight.dtype))
        attn.head_dim = head_dim
        layer.num_heads = attn.num_heads = shape.num_attention_heads
