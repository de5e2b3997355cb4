"""Sequential compensation under ``--offload``: the offloaded ``refit`` is the in-memory sequential refit
(same plan, same weights), and ``sequential=True`` (``--offload_sequential``) is never worse than the
one-shot compensation on the calibration loss (it keeps the better of the two candidates it builds)."""
import copy
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from LLMPruner import load_pruned, prune, save_pruned
from LLMPruner.compensate.sequential import calibration_loss
from LLMPruner.stream.pipeline import prune_offloaded

EXAMPLES = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(0))
RANGES = dict(attention_layers=range(0, 3), mlp_layers=range(0, 3))
CHOICE = re.compile(r"calibration loss ([\d.]+) sequential, ([\d.]+) one-shot: keeping the (\S+) model")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _loss(folder: Path, examples: torch.Tensor) -> float:
    model, _ = load_pruned(folder)
    return calibration_loss(model, examples)


@pytest.mark.parametrize("kw", [dict(pruner_type="taylor", pruning_ratio=0.5),
                                dict(pruner_type="wanda", pruning_ratio=0.5),        # per layer, re-selected
                                dict(pruner_type="fluctuation", param_budget=0.3)],  # global budget, re-selected
                         ids=["taylor", "wanda", "fluctuation-budget"])
@pytest.mark.parametrize("tied", [False, True])
def test_offloaded_refit_is_the_in_memory_refit(tmp_path, kw, tied):
    """The same ``refit_sequential_layer`` (held-out ridge choice, fallback to slicing, re-selection)."""
    model = tiny_model(num_hidden_layers=3, tie_word_embeddings=tied)
    dense = copy.deepcopy(model)
    ranges = {} if "param_budget" in kw else RANGES
    common = dict(examples=EXAMPLES, compensation="refit", calibration_batch_size=4, **ranges, **kw)
    in_memory = prune(model, **common)
    save_pruned(model, None, tmp_path / "mem")
    streamed = prune_offloaded(dense, save_to=tmp_path / "off", **common)
    assert streamed.plan.removed_units == in_memory.plans[-1].removed_units
    assert any(streamed.plan.removed_units.values())
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "off")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    refit = [k for k in a if k.endswith(("o_proj.weight", "down_proj.weight"))]
    sliced = _tensors_sliced(dense, streamed.plan)
    assert any(not torch.allclose(a[k], sliced[k]) for k in refit)  # the refit did change weights


def _tensors_sliced(model, plan):
    params = dict(model.named_parameters())
    out = {}
    for name, dims in plan.keep.items():
        t = params[name].detach()
        for d, keep in sorted(dims.items()):
            t = t.index_select(d, torch.as_tensor(keep))
        out[name] = t
    return out


SETTINGS = [(p, r, c) for p in ("taylor", "l2", "wanda", "fluctuation") for r in (0.5, 0.25)
            for c in ("refit", "bias")]


def _never_worse(source, examples, tmp_path, caplog, pruner_type, ratio, comp, **ranges):
    oneshot = "refit_oneshot" if comp == "refit" else "bias"
    kw = dict(examples=examples, pruner_type=pruner_type, pruning_ratio=ratio, calibration_batch_size=4, **ranges)
    prune_offloaded(source, save_to=tmp_path / "one", compensation=oneshot, **kw)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="LLMPruner.compensate.sequential"):
        prune_offloaded(source, save_to=tmp_path / "guarded", compensation=comp, sequential=True, **kw)
    found = [CHOICE.search(r.getMessage()) for r in caplog.records]
    (seq, one, kept), = [m.groups() for m in found if m]
    losses = {name: _loss(tmp_path / name, examples) for name in ("one", "guarded")}
    assert losses["guarded"] <= losses["one"] + 1e-5, (pruner_type, ratio, comp, losses)
    assert abs(float(one) - losses["one"]) < 1e-3                    # the candidate is the one-shot model
    assert abs(min(float(seq), float(one)) - losses["guarded"]) < 1e-3  # and the better one was kept
    assert (float(one) <= float(seq)) if kept == "one-shot" else (float(seq) <= float(one))
    if comp == "refit":  # the sequential candidate is the plain (unguarded) sequential refit
        prune_offloaded(source, save_to=tmp_path / "seq", compensation="refit", **kw)
        assert abs(float(seq) - _loss(tmp_path / "seq", examples)) < 1e-3
    assert not [p for p in (tmp_path / "guarded").iterdir() if p.name.startswith(".")]  # no stray candidate
    return kept


def test_sequential_never_worse_on_a_tiny_model(tmp_path, caplog):
    model = tiny_model(num_hidden_layers=3)
    kept = set()
    for i, (pruner_type, ratio, comp) in enumerate(SETTINGS):
        kept.add(_never_worse(model, EXAMPLES, tmp_path / str(i), caplog, pruner_type, ratio, comp, **RANGES))
    assert kept == {"one-shot", "sequential"}  # both branches of the choice ran


@pytest.mark.slow
def test_sequential_never_worse_on_stories260k(stories_path, tmp_path, caplog):
    """The settings of bench/offload_sequential.py (16 x 64 TinyStories tokens)."""
    from LLMPruner import load_model
    from LLMPruner.data.calibration import calibration_examples
    _, tokenizer = load_model(stories_path)
    text = Path(stories_path).parents[1] / "data" / "tinystories" / "tinystories_val.txt"
    if not text.exists():
        pytest.skip(f"needs {text}")
    examples = calibration_examples(str(text), tokenizer, 16, 64, 0)
    for i, (pruner_type, ratio, comp) in enumerate(SETTINGS):
        _never_worse(stories_path, examples, tmp_path / str(i), caplog, pruner_type, ratio, comp,
                     attention_layers=range(1, 4), mlp_layers=range(0, 5))


def test_too_few_tokens_for_a_refit_are_refused_as_in_memory():
    model = tiny_model(num_hidden_layers=2)
    few = EXAMPLES[:2, :16]  # 32 tokens for 48-wide MLP inputs
    for run in (prune, prune_offloaded):
        with pytest.raises(ValueError, match="--compensation refit: 32 calibration tokens"):
            run(copy.deepcopy(model), examples=few, compensation="refit", pruner_type="wanda", **RANGES)


def test_sequential_compensation_of_the_hidden_size_is_refused():
    model = tiny_model(num_hidden_layers=2)
    with pytest.raises(ValueError, match="--compensation refit with --channel_wise: sequential compensation"):
        prune_offloaded(model, mode="channel_wise", examples=EXAMPLES, compensation="refit", pruner_type="l2")
    with pytest.raises(ValueError, match="--compensation bias --offload_sequential with --channel_wise"):
        prune_offloaded(model, mode="channel_wise", examples=EXAMPLES, compensation="bias", sequential=True)
