"""Gemma, Gemma-2, VaultGemma and Gemma-3's text model (``gemma3_text``: the 270M and 1B checkpoints, and the language
model of the 4B-27B image-text ones with ``--text_only``, ``checkpoint/multimodal.py``): LLaMA names, ``head_dim`` independent of hidden/heads, ``(1 + w)`` RMSNorms,
Gemma-2's extra pre/post feed-forward norms, logit soft-capping and alternating sliding-window layers.

Tracing handles all of it (the norms join the hidden channels, soft-capping is elementwise). What it cannot
know: the embeddings are multiplied by ``sqrt(hidden_size)``, a constant the stock model recomputes from
``config.hidden_size`` when it is built. After channel-wise pruning the pruned model must keep the
*original* constant, so it is written to ``config.embedding_scale`` and restored by ``prepare``.
"""
from __future__ import annotations

import torch.nn as nn

from LLMPruner.structure import ModelStructure
from LLMPruner.adapters.llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text", "vaultgemma")

    def update_config(self, model: nn.Module) -> ModelStructure:
        embed = model.get_input_embeddings()
        model.config.embedding_scale = float(embed.embed_scale)  # the unpruned model's sqrt(hidden)
        return super().update_config(model)

    def prepare(self, model: nn.Module) -> None:
        scale = getattr(model.config, "embedding_scale", None)
        if scale is not None:
            embed = model.get_input_embeddings()
            embed.embed_scale.fill_(scale)
            embed.scalar_embed_scale = scale
