"""Mixture-of-experts decoders in transformers 5's fused layout (``mlp.experts`` holding ``[E, ...]``
parameters, a router ``mlp.gate`` / ``mlp.router`` of ``[E, hidden]``): Qwen2-MoE, Qwen3-MoE, Mixtral,
OLMoE, GPT-OSS, PhiMoE, FlexOlmo, Command A MoE (``cohere2_moe``), GLM-4.5/4.6 (``glm4_moe``, group-limited
routing with a score-correction bias), MiniMax-M2, Hunyuan-A13B (``hunyuan_v1_moe``). LLMPruner removes their whole experts (``LLMPruner/experts/core.py``, ``hf_prune.py
--prune_experts``); heads, channels, the hidden size and layers of these models are not pruned
(``experts_only``), so the shapes the config describes never change except the expert count, which
``remove_experts`` writes."""
from __future__ import annotations

import torch.nn as nn

from LLMPruner.structure import ModelStructure
from LLMPruner.adapters.llama import LlamaAdapter


class MoeAdapter(LlamaAdapter):
    model_types = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "phimoe", "flex_olmo", "cohere2_moe",
                   "glm4_moe", "minimax_m2", "hunyuan_v1_moe")
    experts_only = True
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")  # the experts are 3-D parameters

    def mlp_width(self, mlp: nn.Module, config) -> int:
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


class MlaMoeAdapter(MoeAdapter):
    """DeepSeek-V2/V3 and Kimi K2 (``deepseek_v3``): experts as above (group-limited routing, a score-correction
    bias), attention by multi-head latent attention: every head reads its keys and values from one shared
    latent, so a layer's KV heads are its heads, and the head width recorded is ``v_head_dim`` (``o_proj``'s
    input is heads x v_head_dim)."""

    model_types = ("deepseek_v2", "deepseek_v3")
    lora_target_modules = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

    def head_dim(self, model: nn.Module) -> int:
        return int(model.config.v_head_dim)

    def kv_heads(self, layer: nn.Module, heads: int, head_dim: int) -> int:
        return heads
