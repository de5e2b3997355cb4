"""Efficiency statistics (the reference's ``test_speedup.py``): parameters, MACs, memory, latency.

MACs are counted from the actual module shapes, so a heterogeneously pruned model counts each layer as
it is. For one sequence of ``T`` tokens::

    linear MACs    = T * sum(in_features * out_features)        over every nn.Linear (lm_head included)
    attention MACs = sum over layers of 2 * heads_l * head_dim * T * T   (QK^T and attn @ V, full square)
    expert MACs    = T * sum over MoE layers of (top_k * one expert's weights + the router's)   (active ones)

Embedding look-ups, norms, activations and softmax are not counted (as ptflops does for LLaMA).
"""
from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn as nn

from LLMPruner.adapters import get_adapter

logger = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_bytes(model: nn.Module) -> int:
    """Bytes held by distinct parameters and buffers."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def count_macs(model: nn.Module, seq_len: int) -> dict[str, int]:
    """``{"linear", "attention", "experts", "total"}`` multiply-accumulates of one forward pass over ``seq_len``
    tokens (``experts``: the mixture-of-experts layers' routers and the ``top_k`` experts each token runs)."""
    from LLMPruner.experts.core import moe_layers
    linear = seq_len * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    structure = get_adapter(model).read_structure(model)
    attention = sum(2 * s.num_attention_heads * structure.head_dim * seq_len * seq_len
                    for s in structure.layers)
    experts = seq_len * sum(moe.top_k(model.config) * sum(p[0].numel() for p in moe.experts.parameters()
                                                          if p.dim() == 3)
                            + sum(p.numel() for p in moe.router.parameters() if p.dim() == 2)
                            for moe in moe_layers(model))
    return {"linear": linear, "attention": attention, "experts": experts, "total": linear + attention + experts}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_latency(model: nn.Module, seq_len: int = 128, batch_size: int = 1, new_tokens: int = 32,
                    warmup: int = 2, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Forward latency/throughput on random token ids, and greedy generation of exactly ``new_tokens``."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    forward_s = _time(lambda: model(ids, use_cache=False), device, warmup, repeats)
    prompt = ids[:, : max(1, min(8, seq_len))]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    generate_s = _time(lambda: model.generate(prompt, **gen), device, min(warmup, 1), max(1, repeats // 2))
    model.train(was_training)
    return {"forward_ms": forward_s * 1e3, "forward_tokens_per_s": batch_size * seq_len / forward_s,
            "generate_ms": generate_s * 1e3, "generate_tokens_per_s": batch_size * new_tokens / generate_s}


def peak_memory_bytes(model: nn.Module, seq_len: int, batch_size: int = 1) -> int | None:
    """Peak CUDA memory allocated during one forward pass (``None`` off CUDA)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    with torch.no_grad():
        model(ids, use_cache=False)
    return int(torch.cuda.max_memory_allocated(device))


def model_statistics(model: nn.Module, seq_len: int = 128, latency: bool = True, batch_size: int = 1,
                     new_tokens: int = 32, repeats: int = 5) -> dict:
    """All statistics of one model as a flat JSON-able dict."""
    stats: dict = {"params": count_parameters(model), "model_mb": model_bytes(model) / 2**20,
                   "seq_len": seq_len}
    stats.update({f"macs_{k}": v for k, v in count_macs(model, seq_len).items()})
    if latency:
        stats.update(measure_latency(model, seq_len, batch_size, new_tokens, repeats=repeats))
        peak = peak_memory_bytes(model, seq_len, batch_size)
        if peak is not None:
            stats["peak_forward_mb"] = peak / 2**20
    stats["device"] = str(next(model.parameters()).device)
    logger.info("statistics: %s", stats)
    return stats
