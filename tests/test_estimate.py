"""Importance estimators against hand-computed values and an independent autograd computation."""
import pytest
import torch

from conftest import tiny_model
from LLMPruner.score.estimate import _combine, channel_reduce, estimate, taylor_scores
from LLMPruner.discover import discover

W = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
G = torch.tensor([[3.0, 1.0], [2.0, -1.0]])


def test_channel_reduce_by_hand():
    s = W * G  # [[3, -2], [1, -1]]
    assert channel_reduce(s, 0).tolist() == [5.0, 2.0]                    # param_first, rows
    assert channel_reduce(s, 1).tolist() == [4.0, 3.0]                    # param_first, columns
    assert channel_reduce(s, 0, abs_first=False).tolist() == [1.0, 0.0]   # vectorize: |3-2|, |1-1|
    assert channel_reduce(W.abs(), 0).tolist() == [3.0, 1.5]              # l1


def test_grouping_strategies_by_hand():
    per_member = torch.tensor([[1.0, 4.0], [3.0, 2.0]])  # 2 members x 2 units
    assert _combine(per_member, "sum").tolist() == [4.0, 6.0]
    assert _combine(per_member, "mean").tolist() == [2.0, 3.0]
    assert _combine(per_member, "max").tolist() == [3.0, 4.0]
    assert _combine(per_member, "prod").tolist() == [3.0, 8.0]
    assert _combine(per_member, "last").tolist() == [3.0, 2.0]


def _independent(model, fam, examples, mode):
    """Scores recomputed from scratch with autograd.grad and per-example Fisher."""
    params = dict(model.named_parameters())
    names = sorted({m.param for m in fam.members})
    def grads(batch):
        loss = model(input_ids=batch, labels=batch).loss
        return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
    g = grads(examples)
    fisher = {n: sum(grads(examples[i:i + 1])[n] ** 2 for i in range(len(examples))) / len(examples)
              for n in names}
    out = []
    for m in fam.members:
        w = params[m.param].detach()
        sal = {"vectorize": w * g[m.param], "param_first": w * g[m.param],
               "param_second": 0.5 * w * fisher[m.param] * w,
               "param_mix": w * g[m.param] - 0.5 * w * fisher[m.param] * w}[mode]
        other = [d for d in range(w.ndim) if d != m.dim]
        per_channel = sal.sum(other).abs() if mode == "vectorize" else sal.abs().sum(other)
        out.append(per_channel[m.indices].sum(1))
    return torch.stack(out).sum(0)


@pytest.mark.parametrize("mode", ["vectorize", "param_first", "param_second", "param_mix"])
def test_taylor_matches_independent_computation(mode):
    model = tiny_model()
    fams = [f for f in discover(model).families if f.layer == 1]
    ex = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    scores = estimate(model, fams, pruner_type="taylor", taylor=mode, examples=ex)
    for fam in fams:
        torch.testing.assert_close(scores[fam.key], _independent(model, fam, ex, mode), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert all(p.requires_grad for p in model.parameters())


def test_magnitude_scores_by_hand():
    model = tiny_model()
    fam = discover(model).find("mlp", 0)[0]
    l1 = estimate(model, [fam], pruner_type="l1")[fam.key]
    mlp = model.model.layers[0].mlp
    j = 7
    expect = mlp.gate_proj.weight[j].abs().sum() + mlp.up_proj.weight[j].abs().sum() + mlp.down_proj.weight[:, j].abs().sum()
    torch.testing.assert_close(l1[j], expect.detach())


def test_random_is_seeded():
    model = tiny_model()
    fams = discover(model).find("mlp")
    a = estimate(model, fams, pruner_type="random", seed=3)
    b = estimate(model, fams, pruner_type="random", seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_scored_parameters_take_gradients():
    model = tiny_model()
    fam = discover(model).find("mlp", 2)[0]
    seen = []
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: seen.append(n))
    taylor_scores(model, [fam], torch.randint(0, 64, (2, 8)), "param_first")
    assert seen and all(".layers.2.mlp." in n for n in seen)
