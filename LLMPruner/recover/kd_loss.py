"""The distillation loss, computed in chunks of tokens so that no full ``[tokens, vocab]`` tensor exists.

For N labelled positions (next-token targets ``y``), student logits ``z_s`` and teacher logits ``z_t``::

    loss = w_kl * T^2 * mean_n KL(softmax(z_t/T) || softmax(z_s/T)) + w_ce * mean_n CE(z_s, y)

(Hinton et al.'s T^2 keeps the gradient's size independent of T.) Worked example, V = 2, one token,
T = 1: z_t = (0, 0), z_s = (ln 3, 0) -> p = (1/2, 1/2), q = (3/4, 1/4),
KL = 1/2 ln(2/3) + 1/2 ln(2) = 0.1438; dKL/dz_s = q - p = (1/4, -1/4).

Each side is given either as *hidden states and a head weight* (``logits = h @ W.T``: the fused form,
logits exist ``chunk`` rows at a time) or as logits already computed (``weight=None``). The gradient with
respect to the student's hidden states and head weight is computed chunk by chunk in the forward pass and
only scaled in the backward pass, so nothing is recomputed and nothing of size N x V is saved:
``dL/dz_s = (w_kl * T * (q_T - p_T) + w_ce * (softmax(z_s) - onehot(y))) / N``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class KDLoss(NamedTuple):
    loss: torch.Tensor  # the weighted objective (differentiable)
    kl: torch.Tensor    # mean KL at temperature T, without the T^2 factor (for logging)
    ce: torch.Tensor    # mean next-token cross-entropy of the student at T = 1 (for logging)


def _logits(h: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return (h if weight is None else h @ weight.to(h.dtype).T).float()  # [c, V]


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, target, temperature: float, w_kl: float, w_ce: float, chunk: int):
        n = h_s.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], w_s is not None and ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h_s) if want_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if want_w else None
        kl_sum = h_s.new_zeros((), dtype=torch.float32)
        ce_sum = h_s.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            zs = _logits(h_s[i:i + chunk], w_s)                                # [c, V]
            zt = _logits(h_t[i:i + chunk], w_t).to(zs.device)                  # [c, V]
            log_q = F.log_softmax(zs / temperature, dim=-1)
            log_p = F.log_softmax(zt / temperature, dim=-1)
            p = log_p.exp()
            kl_sum += (p * (log_p - log_q)).sum()
            log_q1 = log_q if temperature == 1.0 else F.log_softmax(zs, dim=-1)
            tgt = target[i:i + chunk].to(zs.device)
            ce_sum -= log_q1.gather(1, tgt[:, None]).sum()
            if not (want_h or want_w):
                continue
            g = (w_kl * temperature) * (log_q.exp() - p)                       # d(T^2 KL)/dz_s
            if w_ce:
                g1 = log_q1.exp()
                g1[torch.arange(g1.shape[0], device=g1.device), tgt] -= 1.0
                g += w_ce * g1
            g /= n
            if want_h:
                grad_h[i:i + chunk] = (g if w_s is None else g @ w_s.float()).to(h_s.dtype)
            if want_w:
                grad_w += g.T @ h_s[i:i + chunk].float()                       # [V, H]
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.w_dtype = None if w_s is None else w_s.dtype
        denom = max(n, 1)
        loss = (w_kl * temperature ** 2 * kl_sum + w_ce * ce_sum) / denom
        kl, ce = kl_sum / denom, ce_sum / denom
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None, None, None


def chunked_kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
                    student_weight: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                    temperature: float = 1.0, kl_weight: float = 1.0, ce_weight: float = 0.0,
                    chunk: int = 256) -> KDLoss:
    """The distillation loss over N positions.

    ``student``/``teacher``: ``[N, H]`` hidden states with their head ``*_weight`` ``[V, H]``, or ``[N, V]``
    logits with ``*_weight=None``; ``target``: ``[N]`` next-token ids. ``chunk`` rows of logits at a time.
    """
    assert student.dim() == 2 and teacher.shape[0] == student.shape[0] == target.shape[0], \
        (tuple(student.shape), tuple(teacher.shape), tuple(target.shape))
    assert temperature > 0 and chunk > 0, (temperature, chunk)
    return KDLoss(*_ChunkedKD.apply(student, student_weight, teacher, teacher_weight, target, float(temperature),
                                    float(kl_weight), float(ce_weight), int(chunk)))
