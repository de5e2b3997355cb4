"""Taylor importance with one decoder layer on the device at a time, equal to the in-memory scores.

1. embeddings: the model's forward up to its first layer gives ``h_0`` ``[N, T, H]`` and the layer call;
2. forward, no grad: ``h_{i+1} = layer_i(h_i)``; only the boundary states are kept;
3. head, one example at a time, in slices of the sequence: the model's own loss on ``h_L[n]``;
   ``G_L[n] = d loss_n / d h_L[n] / N`` is the gradient of the batch's mean loss (all windows have the
   same length). A slice of positions ``a..b`` (with position ``b`` too, whose token is the last label)
   runs the model's final norm, head and loss on those positions alone, weighted by its share of the
   example's predictions, so the logits held at once are ``states.HEAD_CHUNK_BYTES``, not a whole window's;
4. backward, top down: load layer i, recompute its forward from ``h_i`` with grad, backpropagate
   ``G_{i+1}``, turn its parameter gradients into channel scores at once (``TaylorAccumulator``, the
   in-memory hook logic), keep only ``G_i = d loss / d h_i``; the Fisher modes also backpropagate each
   example alone (``N * G_{i+1}[n]``: the gradient of that example's mean loss, as in memory);
5. embeddings again (only if an embedding is scored, i.e. the hidden family): backpropagate ``G_0``.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from LLMPruner.adapters import get_adapter
from LLMPruner.score.estimate import Slot, TaylorAccumulator, TaylorMode, slots_of
from LLMPruner.discover import Family
from LLMPruner.stream.states import LayerCall, StateStore, capture, sliced_head_losses
from LLMPruner.stream.weights import Part, WeightSource, layers_prefix

logger = logging.getLogger(__name__)


def streamed_taylor_scores(model: nn.Module, source: WeightSource, families: list[Family],
                           examples: torch.Tensor, mode: TaylorMode, *, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None, states: StateStore | None = None
                           ) -> dict[Slot, torch.Tensor]:
    """Channel scores of ``families`` for the meta-device ``model`` whose weights ``source`` holds."""
    layers = get_adapter(model).decoder_layers(model)
    prefix = layers_prefix(model, layers)
    needed = slots_of(families)
    n, n_layers = examples.shape[0], len(layers)
    if examples.shape[1] < 2:
        raise ValueError(f"Taylor scores need calibration windows of at least 2 tokens (a next token to predict), "
                         f"got {examples.shape[1]}: raise --calibration_seq_len")
    fisher = mode in ("param_second", "param_mix")
    acc = TaylorAccumulator(needed, mode, n)
    outer = Part(model, prefix, None)
    outer_needed = [name for name in outer.names if name in needed]
    if fisher and outer_needed and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(f"--offload with --taylor {mode} and tied embeddings in the pruned family: the "
                         "per-example Fisher of the shared embedding needs both of its uses at once; use "
                         "--taylor param_first/vectorize, or prune without --offload")
    states = states or StateStore()
    # 1.-2. embeddings, then the forward through every layer, keeping the boundary states
    outer.load(source, device, dtype)
    with torch.no_grad():
        h, call = capture(model, layers, examples)
        call1 = capture(model, layers, examples[:1])[1] if fisher else call
    outer.release()
    states.put(0, h)
    for i in tqdm(range(n_layers), desc="taylor forward (per layer)", leave=False):
        part = Part(model, prefix, i)
        part.load(source, device, dtype)
        with torch.no_grad():
            states.put(i + 1, call(layers[i], states.get(i).to(device)))
        part.release()
    # 3. the head: the model's loss, one example at a time
    grad, head_grads = _head(model, layers, outer, source, examples, states.get(n_layers), call, acc,
                             outer_needed, fisher, device, dtype)
    # 4. top down through the layers
    for i in tqdm(reversed(range(n_layers)), total=n_layers, desc="taylor backward (per layer)", leave=False):
        part = Part(model, prefix, i)
        part.load(source, device, dtype)
        grad = _layer_backward(layers[i], part, states.get(i).to(device), grad, call, call1, acc, mode)
        part.release()
        states.drop(i + 1)
    # 5. the embeddings (the hidden family only)
    if outer_needed:
        _embedding_backward(model, layers, outer, source, examples, grad, head_grads, acc, outer_needed, fisher,
                            device, dtype)
    states.close()
    return acc.result()


def _check(loss: torch.Tensor, what: str) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"calibration loss is {loss.item()} on the {what}; the model's dtype may "
                                 "overflow: try --dtype float32 or bfloat16")


def _head(model, layers, outer, source, examples, last, call: LayerCall, acc, outer_needed, fisher, device, dtype):
    n = examples.shape[0]
    outer.load(source, device, dtype)
    params = outer.params()
    for name in outer_needed:
        params[name].requires_grad_(True)
    grads: dict[str, torch.Tensor] = {}
    out = torch.zeros_like(last)
    for k in tqdm(range(n), desc="taylor head (per example)", leave=False):
        for a, b, h, loss in sliced_head_losses(model, layers, examples[k:k + 1], last[k:k + 1], call.as_tuple,
                                                device, requires_grad=True):
            _check(loss, f"example {k}")
            loss.backward()
            out[k:k + 1, a:b + 1] += (h.grad / n).to(out.device)
        for name in outer_needed:
            g = params[name].grad
            params[name].grad = None
            if g is None:
                continue
            if fisher:
                acc.phase = "fisher"
                acc.add(name, params[name], g)
            grads[name] = grads.get(name, 0) + g.detach().cpu() / n
    outer.release()
    return out, grads  # the head's share of the batch gradient; the embedding stage adds its own


def _layer_backward(layer, part, x, grad_out, call: LayerCall, call1: LayerCall, acc, mode):
    params = {name: p for name, p in part.params().items() if name in acc.needed}
    for p in params.values():
        p.requires_grad_(True)
    n = x.shape[0]
    grad_out = grad_out.to(x.device)
    if mode in ("param_second", "param_mix"):
        acc.phase = "fisher"
        for k in range(n):  # the gradient of example k's own mean loss
            call1(layer, x[k:k + 1]).backward(grad_out[k:k + 1] * n)
            _feed(acc, params)
    xg = x.clone().requires_grad_(True)
    call(layer, xg).backward(grad_out)
    if mode != "param_second":
        acc.phase = "grad"
        _feed(acc, params)
    for p in params.values():
        p.grad = None
    return xg.grad.detach()


def _feed(acc: TaylorAccumulator, params: dict[str, nn.Parameter]) -> None:
    for name, p in params.items():
        assert p.grad is not None, f"no gradient reached {name}"
        acc.add(name, p, p.grad)
        p.grad = None


def _embedding_backward(model, layers, outer, source, examples, grad, head_grads, acc, outer_needed, fisher,
                        device, dtype):
    n = examples.shape[0]
    outer.load(source, device, dtype)
    params = outer.params()
    for name in outer_needed:
        params[name].requires_grad_(True)
    total = dict(head_grads)
    batches = [(k, examples[k:k + 1], grad[k:k + 1]) for k in range(n)] if fisher else [(None, examples, grad)]
    for k, ids, g_out in batches:
        h, _ = capture(model, layers, ids)
        h.backward(g_out.to(h.device) * (n if k is not None else 1))
        for name in outer_needed:
            g = params[name].grad
            params[name].grad = None
            if g is None:
                continue
            if k is not None:
                acc.phase = "fisher"
                acc.add(name, params[name], g)
            total[name] = total.get(name, 0) + g.detach().cpu() / (n if k is not None else 1)
    if acc.mode != "param_second":
        acc.phase = "grad"
        for name in outer_needed:
            acc.add(name, params[name], total[name].to(params[name].device))
    outer.release()
