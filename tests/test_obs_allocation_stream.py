"""The OBS allocation's statistics run layer by layer (obs_allocation.layer_grams): the same Grams and
residual energies as one hooked forward of the whole model, but only one layer's Grams alive at a time
(24 x 1,536^2 float64 = 453 MB at once on SmolLM2, 31 GB on LLaMA-7B), and no layer run past the last
one that is pruned."""
import gc
import weakref

import torch

from conftest import tiny_model
from LLMPruner.score.activations import collect_input_stats, consumers
from LLMPruner.discover import discover
from LLMPruner.select.allocation import layer_grams

EX = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))


def _setup(layers=4):
    model = tiny_model(num_hidden_layers=layers, seed=3)
    fams = [f for f in discover(model).families if f.kind == "mlp" and f.layer in (1, 2)]
    return model, consumers(model, fams)


def test_the_grams_and_energies_are_those_of_one_hooked_forward():
    model, cons = _setup()
    whole = collect_input_stats(model, cons, EX, batch_size=4, gram=True)
    energy = {}
    hooks = [layer.register_forward_hook(
        lambda m, a, y, i=i: energy.__setitem__(i, energy.get(i, 0.0) + float((y[0] if isinstance(y, tuple) else y)
                                                                              .double().pow(2).sum())))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for s in range(0, len(EX), 4):
            model(input_ids=EX[s:s + 4], use_cache=False)
    for h in hooks:
        h.remove()
    got = list(layer_grams(model, cons, EX, batch_size=4))
    assert [i for i, _, _ in got] == [1, 2]
    for i, grams, e in got:
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert list(grams) == [name]
        torch.testing.assert_close(grams[name], whole[name].gram, rtol=1e-12, atol=1e-12)
        assert grams[name].dtype == torch.float64
        assert abs(e - energy[i]) <= 1e-9 * energy[i]


def test_one_layer_of_grams_at_a_time_and_no_layer_past_the_last_owner():
    model, cons = _setup()
    ran = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
             for i, layer in enumerate(model.model.layers)]
    previous = None
    for i, grams, _ in layer_grams(model, cons, EX, batch_size=4):
        if previous is not None:
            gc.collect()
            assert previous() is None, f"layer {i - 1}'s Gram is still alive while layer {i}'s exist"
        previous = weakref.ref(next(iter(grams.values())))
        del grams
    for h in hooks:
        h.remove()
    assert sorted(set(ran)) == [0, 1, 2]                         # layer 3 owns nothing and never runs
    assert ran.count(1) == len(range(0, len(EX), 4))             # each layer once per batch
