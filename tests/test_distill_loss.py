"""The chunked distillation loss: hand-computed values, T^2 scaling, chunked == unchunked, zero at equality."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from LLMPruner.recover.kd_loss import chunked_kd_loss


def test_hand_computed_kl_and_gradient_at_t1():
    # p = softmax(0, 0) = (1/2, 1/2); q = softmax(ln 3, 0) = (3/4, 1/4)
    zs = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    out = chunked_kd_loss(zs, torch.zeros(1, 2), torch.tensor([0]))
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert out.kl.item() == pytest.approx(kl, abs=1e-6) and out.loss.item() == pytest.approx(kl, abs=1e-6)
    assert out.ce.item() == pytest.approx(-math.log(0.75), abs=1e-6)  # logged even with the CE weight 0
    (grad,) = torch.autograd.grad(out.loss, zs)
    torch.testing.assert_close(grad, torch.tensor([[0.25, -0.25]]))  # q - p


def test_temperature_scales_the_loss_by_t_squared_and_the_gradient_by_t():
    # at T = 2, z_s = (2 ln 3, 0) gives the same q as above; CE (T = 1) sees softmax = (9/10, 1/10)
    zs = torch.tensor([[2 * math.log(3.0), 0.0]], requires_grad=True)
    out = chunked_kd_loss(zs, torch.zeros(1, 2), torch.tensor([0]), temperature=2.0, kl_weight=0.5, ce_weight=0.5)
    kl = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    assert out.kl.item() == pytest.approx(kl, abs=1e-6)
    assert out.ce.item() == pytest.approx(-math.log(0.9), abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * 4 * kl - 0.5 * math.log(0.9), abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, zs)
    # 0.5 * T * (q - p) + 0.5 * (softmax(z_s) - onehot(0)) = 0.5*2*(1/4, -1/4) + 0.5*(-1/10, 1/10)
    torch.testing.assert_close(grad, torch.tensor([[0.25 - 0.05, -0.25 + 0.05]]))


def reference(hs, ws, ht, wt, y, t, w_kl, w_ce):
    """The unchunked loss by plain autograd."""
    zs, zt = hs @ ws.T, ht @ wt.T
    kl = F.kl_div(F.log_softmax(zs / t, -1), F.log_softmax(zt / t, -1), log_target=True, reduction="batchmean")
    return w_kl * t * t * kl + w_ce * F.cross_entropy(zs, y)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature,w_kl,w_ce", [(1.0, 1.0, 0.0), (2.0, 0.7, 0.3), (0.5, 0.0, 1.0)])
def test_chunked_fused_head_equals_unchunked_autograd(chunk, temperature, w_kl, w_ce):
    torch.manual_seed(0)
    n, h, ht_dim, v = 7, 5, 6, 11
    hs, ws = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    ht, wt, y = torch.randn(n, ht_dim), torch.randn(v, ht_dim), torch.randint(0, v, (n,))
    want = reference(hs, ws, ht, wt, y, temperature, w_kl, w_ce)
    want_grads = torch.autograd.grad(want, [hs, ws])
    got = chunked_kd_loss(hs, ht, y, student_weight=ws, teacher_weight=wt, temperature=temperature,
                          kl_weight=w_kl, ce_weight=w_ce, chunk=chunk)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got.loss * 3.0, [hs, ws]), want_grads):  # upstream grads scale too
        torch.testing.assert_close(g, 3.0 * w, rtol=1e-5, atol=1e-6)
    # the logits form (weights None) gives the same loss and the logits' gradient
    zs = (hs @ ws.T).detach().requires_grad_()
    logits = chunked_kd_loss(zs, ht @ wt.T, y, temperature=temperature, kl_weight=w_kl, ce_weight=w_ce, chunk=chunk)
    torch.testing.assert_close(logits.loss, want, rtol=1e-5, atol=1e-6)


def test_zero_when_student_equals_teacher():
    torch.manual_seed(1)
    hs, ws = torch.randn(9, 4, requires_grad=True), torch.randn(13, 4, requires_grad=True)
    out = chunked_kd_loss(hs, hs.detach(), torch.zeros(9, dtype=torch.long), student_weight=ws,
                          teacher_weight=ws.detach(), temperature=1.5, chunk=4)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7) and out.kl.item() == pytest.approx(0.0, abs=1e-7)
    for g in torch.autograd.grad(out.loss, [hs, ws]):
        assert g.abs().max().item() < 1e-7


def test_no_labelled_tokens_gives_zero_loss_and_gradient():
    hs, ws = torch.randn(0, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    out = chunked_kd_loss(hs, torch.randn(0, 4), torch.zeros(0, dtype=torch.long), student_weight=ws,
                          teacher_weight=torch.randn(6, 4))
    assert out.loss.item() == 0.0
    assert torch.autograd.grad(out.loss, ws)[0].abs().sum().item() == 0.0
