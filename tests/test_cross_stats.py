"""compensate.CrossStats without a dense stream (the default refit's ``x = x~``): one ``[in, in]`` float64
Gram per half instead of two equal ones, the same refit bit for bit, and misuse refused."""
import pytest
import torch

from conftest import tiny_model
from LLMPruner.compensate import sequential
from LLMPruner.compensate.refit import CrossStats, refit_layer, solve_refit
from LLMPruner.prune import prune

EX = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))


def _x(seed: int = 0, n: int = 200, d: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def _both(x: torch.Tensor) -> tuple[CrossStats, CrossStats]:
    """The same tokens accumulated with the dense stream passed explicitly (as ``x~``) and without."""
    explicit, shared = CrossStats.empty(x.shape[1]), CrossStats.empty(x.shape[1], dense=False)
    for part in (x[:70], x[70:]):
        explicit.add(part, part)
        shared.add(None, part)
    return explicit, shared


def test_without_a_dense_stream_cross_is_the_gram_and_is_not_stored():
    explicit, shared = _both(_x())
    assert shared.cross is None and explicit.cross is not None
    assert shared.count == explicit.count == 200
    assert torch.equal(shared.gram, explicit.gram) and torch.equal(shared.total, explicit.total)
    assert torch.equal(shared.dense_cross, explicit.cross)       # x.T @ x~ with x = x~: the Gram itself
    assert shared.dense_cross is shared.gram
    m = shared.merged(shared)
    assert m.cross is None and torch.equal(m.gram, 2 * shared.gram) and m.count == 400


def test_the_refit_is_the_same_bit_for_bit():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5])
    x = _x(1, n=400)
    (fe, fs), (ce, cs) = _both(x[0::2]), _both(x[1::2])
    ve, re = refit_layer(w, fe, kept, check=ce)
    vs, rs = refit_layer(w, fs, kept, check=cs)
    assert "lowers" in re and rs == re
    assert torch.equal(vs, ve)


def test_misuse_is_refused():
    x = _x()
    with pytest.raises(ValueError, match="dense inputs x"):
        CrossStats.empty(6, dense=False).add(x, x)
    with pytest.raises(ValueError, match="dense inputs x"):
        CrossStats.empty(6).add(None, x)
    with pytest.raises(ValueError, match="dense stream"):
        CrossStats.empty(6).merged(CrossStats.empty(6, dense=False))


def test_the_sequential_refit_keeps_one_gram_per_half_for_the_pruned_target():
    model = tiny_model(num_hidden_layers=2)
    layer = model.model.layers[0]
    h = [torch.randn(2, 8, 32)]
    pos = torch.arange(8)[None]
    kw = dict(position_embeddings=model.model.rotary_emb(h[0], pos), position_ids=pos)

    def forward(lay, b, x):
        y = lay(x, **kw)
        return y[0] if isinstance(y, tuple) else y

    fit, check = sequential.cross_stats(forward, layer, "mlp.down_proj", h)
    assert fit.cross is None and check.cross is None and fit.count == check.count == 8


class _AlwaysDense(CrossStats):
    """The statistics as they were before: the dense stream stored even when it is the pruned one."""

    @classmethod
    def empty(cls, width: int, dense: bool = True, device=None) -> "CrossStats":
        return super().empty(width, dense=True, device=device)

    def add(self, x, xp, e=None) -> None:
        super().add(xp if x is None else x, xp, e)


@pytest.mark.parametrize("kw", [dict(pruner_type="wanda"), dict(pruner_type="l2", selection="obs")])
def test_pruning_with_the_refit_gives_the_same_weights_as_storing_both_matrices(monkeypatch, kw):
    def run():
        model = tiny_model(num_hidden_layers=3)
        prune(model, param_budget=0.3, compensation="refit", examples=EX, attention_layers=range(0),
              mlp_layers=range(0, 3), **kw)
        return model.state_dict()

    shared = run()
    monkeypatch.setattr(sequential, "CrossStats", _AlwaysDense)
    both = run()
    assert shared.keys() == both.keys()
    for k in shared:
        assert torch.equal(shared[k], both[k]), k


@pytest.mark.parametrize("dense, with_extra", [(False, False), (True, False), (True, True)])
def test_the_final_solve_on_the_halves_equals_the_solve_on_their_merge(dense, with_extra):
    """``refit_layer`` solves on (fit, check) indexed to the kept columns, with no merged [in, in] copy."""
    g = torch.Generator().manual_seed(4)
    x = _x(5, n=300)
    xd = x + 0.1 * torch.randn(x.shape, generator=g)               # a dense stream that differs
    e = torch.randn(300, 4, generator=g)
    halves = []
    for half in (slice(0, None, 2), slice(1, None, 2)):
        s = CrossStats.empty(6, dense=dense)
        s.add(xd[half] if dense else None, x[half], e[half] if with_extra else None)
        halves.append(s)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    kept = torch.tensor([1, 2, 4, 5])
    fit, check = halves
    for ridge in (1e-3, 1.0):
        assert torch.equal(solve_refit(w, (fit, check), kept, ridge), solve_refit(w, fit.merged(check), kept, ridge))
