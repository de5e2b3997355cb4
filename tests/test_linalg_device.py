"""``--linalg_device``: the refit's and OBS's float64 statistics and solves run on a chosen device.

No GPU here, so two things are proved on the CPU. (1) The linear algebra creates nothing off its inputs'
device: run under ``torch.set_default_device("meta")`` with CPU inputs, any tensor made without an
explicit ``device=`` lands on ``meta`` and the next operation that mixes it with a CPU tensor raises.
(2) The device reaches every place that makes those tensors, in memory and under ``--offload`` (spies on
the functions that receive it). Results are the same numbers as before.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

from conftest import tiny_model
from LLMPruner.compensate import sequential
from LLMPruner.select import allocation as obs_allocation, obs
from LLMPruner.compensate.refit import CrossStats, refit_layer, solve_refit
from LLMPruner.select.obs import damped_inverse, obs_select, unit_errors
from LLMPruner.prune import prune
from LLMPruner.stream.pipeline import prune_offloaded

EXAMPLES = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(0))
MLP_ONLY = dict(attention_layers=range(0), mlp_layers=range(0, 3))


@contextlib.contextmanager
def factories_on_meta():
    """Tensors made without ``device=`` go to ``meta``: mixing one with a CPU tensor raises."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def on_meta(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with factories_on_meta():
            return fn(*args, **kwargs)
    return wrapped


def _problem(seed=0, out=5, d=12, n=80):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    fisher = torch.randn(out, out, generator=g, dtype=torch.float64)
    return x, w, x.T @ x, fisher @ fisher.T + torch.eye(out, dtype=torch.float64)


def test_the_factories_trap_works():
    """The check itself: a tensor made without ``device=`` under the trap breaks the next mixed operation."""
    a = torch.ones(3)
    with factories_on_meta(), pytest.raises((RuntimeError, NotImplementedError)):
        (a + torch.zeros(3)).sum().item()


@pytest.mark.parametrize("width", [1, 3])
def test_obs_creates_nothing_off_its_device(width):
    x, w, gram, _ = _problem()
    columns = torch.arange(12).reshape(-1, width)
    prior = torch.rand(columns.shape[0], generator=torch.Generator().manual_seed(1))
    kw = dict(prior=prior, prior_weight=0.5)
    want = obs_select(w, gram, columns, 2, **kw)
    with factories_on_meta():
        got = obs_select(w, gram, columns, 2, **kw)
        hinv, lam = damped_inverse(gram)
        alive = torch.ones(columns.shape[0], dtype=torch.bool, device="cpu")
        alive[0] = False
        errs = unit_errors(w, hinv, columns, lam, alive)
    assert got[0] == want[0] and got[2] == want[2]
    assert torch.equal(got[1], want[1]) and got[1].device.type == "cpu"
    assert errs.device.type == "cpu" and errs[0] == float("inf")


@pytest.mark.parametrize("dense, extra", [(False, False), (True, True)])
def test_the_refit_creates_nothing_off_its_device(dense, extra):
    x, w, _, _ = _problem(seed=2)
    xd, e = x + 0.05, torch.randn(80, 5, generator=torch.Generator().manual_seed(4))
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11])

    def run():
        fit, check = CrossStats.empty(12, dense=dense, device="cpu"), CrossStats.empty(12, dense=dense, device="cpu")
        for s, half in ((fit, slice(0, None, 2)), (check, slice(1, None, 2))):
            s.add(xd[half].float() if dense else None, x[half].float(), e[half] if extra else None)
        return refit_layer(w, fit, kept, check=check), solve_refit(w, (fit, check), kept, 1e-2)

    (want, report), want_solve = run()
    with factories_on_meta():
        (got, got_report), got_solve = run()
    assert report == got_report and torch.equal(got, want) and torch.equal(got_solve, want_solve)
    assert got.device.type == "cpu"


def test_cross_stats_live_on_their_device_and_default_to_the_host():
    assert CrossStats.empty(4).gram.device.type == "cpu"
    s = CrossStats.empty(4, dense=False, device="meta")   # any device: the sums stay where they were made
    s.add(None, torch.ones(3, 4, device="meta"))
    assert s.gram.device.type == "meta" and s.total.device.type == "meta" and s.count == 3


@pytest.fixture
def spies(monkeypatch):
    """Run every float64 step under the factories trap and record the device each one was handed."""
    seen: dict[str, list] = {"empty": [], "reselect": [], "counts": [], "refit": [], "obs": [], "grams": []}
    real_empty = CrossStats.empty.__func__

    def empty(cls, width, dense=True, device=None):
        seen["empty"].append(device)
        return real_empty(cls, width, dense, device)
    monkeypatch.setattr(CrossStats, "empty", classmethod(empty))
    monkeypatch.setattr(CrossStats, "add", on_meta(CrossStats.add))
    real_reselect, real_counts = obs.obs_reselect, obs_allocation.obs_counts

    def reselect(*a, device=None, **k):
        seen["reselect"].append(device)
        return on_meta(real_reselect(*a, device=device, **k))

    def counts(*a, device=None, **k):
        seen["counts"].append(device)
        return real_counts(*a, device=device, **k)
    real_refit, real_obs = sequential.refit_layer, obs.obs_select

    def refit(w, stats, kept, *a, **k):
        seen["refit"].append((w.device, stats.gram.device, kept.device))
        return on_meta(real_refit)(w, stats, kept, *a, **k)

    def select(w, gram, *a, **k):
        seen["obs"].append((w.device, gram.device))
        return on_meta(real_obs)(w, gram, *a, **k)
    import sys
    import LLMPruner.stream.pipeline as pipeline
    prune_module = sys.modules["LLMPruner.prune"]  # (the package's ``prune`` attribute is the function)
    for module in (prune_module, pipeline):
        monkeypatch.setattr(module, "obs_reselect", reselect)
        monkeypatch.setattr(module, "obs_counts", counts)
    real_grams = obs_allocation.stream_grams

    def grams(*a, device=None, **k):
        seen["grams"].append(device)
        return real_grams(*a, device=device, **k)
    import LLMPruner.stream.allocation as streamed
    monkeypatch.setattr(obs_allocation, "stream_grams", grams)
    monkeypatch.setattr(streamed, "stream_grams", grams)
    monkeypatch.setattr(sequential, "refit_layer", refit)
    monkeypatch.setattr(obs, "obs_select", select)
    monkeypatch.setattr(obs_allocation, "obs_select", select)
    return seen


@pytest.mark.parametrize("offload", [False, True])
def test_linalg_device_reaches_every_float64_step(tmp_path, spies, offload):
    """OBS selection, the residual allocation and the sequential refit, in memory and offloaded: each
    step is handed ``linalg_device`` and makes nothing off it; the model is the one made without it."""
    common = dict(pruner_type="l2", param_budget=0.2, compensation="refit", selection="obs",
                  obs_allocation="residual", examples=EXAMPLES, calibration_batch_size=4, **MLP_ONLY)
    model = tiny_model(num_hidden_layers=3, seed=2)
    reference = copy.deepcopy(model)
    prune(reference, **common)
    for key in spies:
        spies[key].clear()
    if offload:
        prune_offloaded(model, save_to=tmp_path / "off", linalg_device="cpu", **common)
        from LLMPruner.checkpoint import load_pruned
        model, _ = load_pruned(tmp_path / "off")
    else:
        prune(model, linalg_device="cpu", **common)
    assert spies["reselect"] == ["cpu"] and spies["counts"] == ["cpu"]
    assert spies["grams"] and all(d is not None and torch.device(d).type == "cpu" for d in spies["grams"])
    assert spies["empty"] and all(d == "cpu" for d in spies["empty"])
    assert spies["refit"] and spies["obs"]
    assert {d.type for step in spies["refit"] + spies["obs"] for d in step} == {"cpu"}
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:  # in memory bit for bit; offloaded as test_offload_obs compares the two passes
        torch.testing.assert_close(got[k], want[k], rtol=1e-5 if offload else 0, atol=1e-6 if offload else 0,
                                   msg=k)


def test_offload_counts_the_float64_matrices_on_a_linalg_device(caplog):
    """On the host they are logged; on a GPU (``--linalg_device cuda``) ``--max_memory`` counts them:
    five float64 ``[in, in]`` matrices for OBS, 5 x 8 x 1,000^2 B = 40 MB here."""
    import logging
    from LLMPruner.stream.pipeline import _check_memory
    model, ex = tiny_model(), torch.zeros(4, 8, dtype=torch.long)
    _check_memory(model, "30MB", torch.float32, ex, False, False, "cpu", stats_width=1000, host_grams=5)
    with caplog.at_level(logging.INFO, logger="LLMPruner"), \
            pytest.raises(ValueError, match="--max_memory 30MB: one stage needs about 0.04 GB"):
        _check_memory(model, "30MB", torch.float32, ex, False, False, "cuda", stats_width=1000, host_grams=5,
                      linalg_device="cuda")
    assert "(1000 channels) take about 38.1 MB of cuda (--linalg_device) memory" in caplog.text


from test_flag_checks import local_flags  # noqa: E402,F401  (the fixture: flags naming local files)


def test_cli_resolves_and_checks_linalg_device(local_flags, capsys):
    import hf_prune
    from LLMPruner.cli import UsageError
    refit = ["--compensation", "refit", "--block_mlp_layer_start", "0"]
    assert hf_prune.parse_args(local_flags + refit).linalg_device == "cpu"
    assert hf_prune.parse_args(local_flags + refit + ["--linalg_device", "auto"]).linalg_device == "cpu"  # = --device
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--linalg_device cuda: CUDA is not available"):
            hf_prune.parse_args(local_flags + refit + ["--linalg_device", "cuda"])
    with pytest.raises(UsageError, match="--linalg_device auto: only --compensation refit"):
        hf_prune.parse_args(local_flags + ["--linalg_device", "auto"])
