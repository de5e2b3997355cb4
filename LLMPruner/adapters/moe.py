"""Mixture-of-experts decoders in transformers 5's fused layout (``mlp.experts`` holding ``[E, ...]``
parameters, a router ``mlp.gate`` / ``mlp.router`` of ``[E, hidden]``): Qwen2-MoE, Qwen3-MoE, Mixtral,
OLMoE, GPT-OSS. LLMPruner removes their whole experts (``LLMPruner/experts.py``, ``hf_prune.py
--prune_experts``); heads, channels, the hidden size and layers of these models are not pruned
(``experts_only``), so the shapes the config describes never change except the expert count, which
``remove_experts`` writes."""
from __future__ import annotations

import torch.nn as nn

from ..structure import LayerShape, ModelStructure
from .llama import LlamaAdapter


class MoeAdapter(LlamaAdapter):
    model_types = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss")
    experts_only = True
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")  # the experts are 3-D parameters

    def read_structure(self, model: nn.Module) -> ModelStructure:
        head_dim = self.head_dim(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        shapes = []
        for layer in self.decoder_layers(model):
            heads = layer.self_attn.o_proj.weight.shape[1] // head_dim
            shapes.append(LayerShape(num_attention_heads=heads,
                                     num_key_value_heads=self.kv_heads(layer, heads, head_dim),
                                     intermediate_size=self._mlp_width(layer.mlp, model.config)))
        return ModelStructure(hidden_size=hidden, head_dim=head_dim, layers=shapes)

    @staticmethod
    def _mlp_width(mlp: nn.Module, config) -> int:
        """A dense layer's MLP channels, or one expert's (``intermediate_dim``; GPT-OSS: ``intermediate_size``)."""
        if hasattr(mlp, "down_proj"):
            return mlp.down_proj.weight.shape[1]
        experts = mlp.experts
        width = getattr(experts, "intermediate_dim", None) or getattr(experts, "intermediate_size", None)
        return int(width or getattr(config, "moe_intermediate_size", None) or config.intermediate_size)

    def update_config(self, model: nn.Module) -> ModelStructure:
        """Nothing to write: expert pruning changes no head or channel count (``remove_experts`` sets the
        expert count itself)."""
        return self.read_structure(model)

    def keep_decoder_layers(self, model: nn.Module, keep: list[int]) -> None:
        raise NotImplementedError("depth pruning of mixture-of-experts models is not supported")
