"""Output-side Fisher factors for OBS: ``F = sum_t g_t g_t^T``, ``g_t`` the gradient of the calibration
language-model loss (summed over tokens) with respect to a consumer's output at token ``t``.

With ``H = sum_t x_t x_t^T`` of its inputs, ``tr(F dW H dW^T)`` is the K-FAC estimate of the loss change
of a weight change ``dW`` (the LLM Surgeon's structured objective): OBS with ``F`` ranks units by their
estimated effect on the loss, not on the layer's output alone, and its errors compare across layers.
Measured on the dense model (one backward pass over the calibration samples; weights get no gradients).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def output_fisher(model: nn.Module, names: list[str], examples: torch.Tensor,
                  batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{weight name: F [out, out] float64}`` for the linear layers ``names`` (their ``.weight``)."""
    fisher: dict[str, torch.Tensor] = {}
    handles = []

    def on_output(name):
        def fn(module, args, y):
            def grad_hook(g):
                g = g.detach().reshape(-1, g.shape[-1]).double()
                fisher[name] = fisher.get(name, 0) + g.T @ g
            y.register_hook(grad_hook)
        return fn

    def grad_through(module, args, y):
        return y.requires_grad_(True)

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(grad_through))
        for name in names:
            handles.append(model.get_submodule(name.rpartition(".")[0]).register_forward_hook(on_output(name)))
        device = next(model.parameters()).device
        for s in range(0, len(examples), batch_size):
            batch = examples[s:s + batch_size].to(device)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            (out.loss * (batch.shape[0] * (batch.shape[1] - 1))).backward()   # summed over tokens
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return {k: v.cpu() for k, v in fisher.items()}
