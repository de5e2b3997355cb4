"""Pruning behaviour: equivalence, identity, invariants, every pruner type and mode, iterative/global."""
import pytest
import torch

from conftest import tiny_model
from LLMPruner.discover import discover
from LLMPruner.plan import PruningPlan
from LLMPruner.prune import prune
from LLMPruner.select.units import make_plan
from LLMPruner.shrink import apply_plan, count_parameters
from tolerance import assert_paths_agree, assert_same

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41]])


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _zero_units(model, family, units):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m in family.members:
            idx = m.indices[units].reshape(-1)
            params[m.param].index_fill_(m.dim, idx, 0.0)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_removing_zeroed_groups_keeps_logits(model_type, attn):
    model = tiny_model(model_type)
    model.config._attn_implementation = attn
    found = discover(model)
    removed = {"attention@1": [0], "mlp@1": [3, 7, 20], "mlp@2": list(range(0, 48, 2)), "attention@2": [1]}
    targets = [f for f in found.families if f.key in removed]
    for fam in targets:
        _zero_units(model, fam, removed[fam.key])
    before = _logits(model)
    structure = apply_plan(model, make_plan(model, targets, removed))
    assert structure.layers[1].num_attention_heads == 2 and structure.layers[2].intermediate_size == 24
    assert_paths_agree(_logits(model), before)


def test_zero_ratio_is_identity():
    model = tiny_model()
    before, n = _logits(model), count_parameters(model)
    prune(model, mode="block_wise", pruning_ratio=0.0, pruner_type="l2",
          attention_layers=range(0, 3), mlp_layers=range(0, 3))
    assert count_parameters(model) == n
    assert_same(_logits(model), before)


def test_gqa_ratio_kept_and_config_consistent():
    model = tiny_model(num_attention_heads=8, num_key_value_heads=2, head_dim=4, hidden_size=32)
    result = prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="l1",
                   attention_layers=range(1, 3), mlp_layers=range(1, 3))
    for i, s in enumerate(result.structure.layers):
        assert s.num_attention_heads // s.num_key_value_heads == 4  # 4 query heads per KV head
        attn = model.model.layers[i].self_attn
        assert attn.q_proj.out_features == attn.q_proj.weight.shape[0] == s.num_attention_heads * 4
        assert attn.num_key_value_groups == 4
        mlp = model.model.layers[i].mlp
        assert mlp.intermediate_size == mlp.gate_proj.out_features == s.intermediate_size
    assert [s.num_key_value_heads for s in result.structure.layers] == [2, 1, 1]
    assert model.config.layer_shapes[1] == {"num_attention_heads": 4, "num_key_value_heads": 1,
                                            "intermediate_size": 24}
    out = model.generate(IDS, max_new_tokens=4, do_sample=False)  # KV cache with per-layer head counts
    assert out.shape == (1, IDS.shape[1] + 4)


def test_never_removes_the_last_unit():
    model = tiny_model(num_key_value_heads=1, num_attention_heads=2)
    result = prune(model, mode="block_wise", pruning_ratio=0.99, pruner_type="l2",
                   attention_layers=range(0, 3), mlp_layers=range(0, 3))
    assert all(s.num_key_value_heads == 1 and s.intermediate_size >= 1 for s in result.structure.layers)


def test_per_layer_ratio_rounds_like_the_reference():
    model = tiny_model()  # 48 MLP channels: keep int(48 * 0.75) = 36
    result = prune(model, mode="block_wise", pruning_ratio=0.25, pruner_type="l2",
                   attention_layers=range(0), mlp_layers=range(0, 3))
    assert [s.intermediate_size for s in result.structure.layers] == [36, 36, 36]


def test_global_pruning_removes_the_total_but_uneven_per_layer():
    model = tiny_model()
    with torch.no_grad():  # make layer 0's MLP clearly the most important
        model.model.layers[0].mlp.down_proj.weight.mul_(100)
    result = prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="l1", global_pruning=True,
                   attention_layers=range(0), mlp_layers=range(0, 3))
    sizes = [s.intermediate_size for s in result.structure.layers]
    assert sum(sizes) == 72 and sizes[0] == 48


def test_iterative_steps_reach_the_same_size():
    ex = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    result = prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="taylor", iterative_steps=3,
                   attention_layers=range(1, 3), mlp_layers=range(1, 3), examples=ex)
    assert len(result.plans) == 3
    assert [s.intermediate_size for s in result.structure.layers] == [48, 24, 24]


def test_channel_wise_shrinks_hidden_and_keeps_head_dim():
    model = tiny_model()
    result = prune(model, mode="channel_wise", pruning_ratio=0.25, pruner_type="l2")
    assert result.structure.hidden_size == 24 == model.config.hidden_size
    assert model.config.head_dim == 8 and model.lm_head.in_features == 24
    assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape[1] == IDS.shape[1] + 3


def test_layer_wise_keeps_first_layers():
    model = tiny_model()
    prune(model, mode="layer_wise", layer=2)
    assert model.config.num_hidden_layers == 2 == len(model.model.layers)
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape[1] == IDS.shape[1] + 3


def test_plan_replays_on_a_fresh_model(tmp_path):
    model = tiny_model()
    result = prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="l2",
                   attention_layers=range(1, 3), mlp_layers=range(0, 2))
    result.plans[0].save(tmp_path / "plan.json")
    fresh = tiny_model()
    apply_plan(fresh, PruningPlan.load(tmp_path / "plan.json"))
    assert_same(_logits(fresh), _logits(model))


@pytest.mark.parametrize("bad, match", [
    (dict(pruning_ratio=1.0), r"--pruning_ratio 1.0: must be in \[0, 1\)"),
    (dict(pruning_ratio=-0.1), r"--pruning_ratio"),
    (dict(mode="layer_wise", layer=9), r"--layer 9: must be between 1 and 3"),
    (dict(pruner_type="l3"), r"--pruner_type 'l3': choose one of random, l1, l2, taylor"),
    (dict(pruner_type="taylor", taylor="third", examples=torch.ones(1, 4, dtype=torch.long)), r"--taylor 'third'"),
    (dict(iterative_steps=0), r"--iterative_steps 0"),
])
def test_bad_arguments(bad, match):
    kwargs = dict(mode="block_wise", pruning_ratio=0.5, attention_layers=range(1, 2), mlp_layers=range(1, 2))
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        prune(tiny_model(), **kwargs)


def test_nan_calibration_loss_is_an_error():
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[3].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="calibration loss is nan.*--dtype float32"):
        prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="taylor",
              attention_layers=range(1, 2), mlp_layers=range(1, 2), examples=torch.tensor([[1, 3, 4, 5]]))


@pytest.mark.parametrize("extra", [
    dict(pruner_type="wanda"),                                            # units re-chosen in the pass
    dict(pruner_type="l2", selection="obs", reconstruct_steps=4),
    dict(pruner_type="l2", selection="obs", obs_allocation="residual", attention_layers=range(0)),
    dict(pruner_type="l2", query_heads=True, iterative_steps=2),          # two plans, the second on shrunk shapes
])
def test_sequential_refit_plan_replays_the_structure_on_a_fresh_model(tmp_path, extra):
    """The refit pass slices layer by layer; its plan still records every kept index, so replaying plan.json
    (as the README says) gives the pruned model's shapes, and the parameters no refit or reconstruction
    touches keep their dense values (a plan of units only replayed as a silent no-op)."""
    examples = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    model = tiny_model()
    result = prune(model, **{**dict(pruning_ratio=0.5, attention_layers=range(1, 3), mlp_layers=range(0, 3),
                                    compensation="refit", examples=examples), **extra})
    assert all(p.keep for p in result.plans)
    fresh = tiny_model()
    for i, plan in enumerate(result.plans):
        plan.save(tmp_path / f"plan{i}.json")
        apply_plan(fresh, PruningPlan.load(tmp_path / f"plan{i}.json"))
    pruned, replayed = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert {n: p.shape for n, p in replayed.items()} == {n: p.shape for n, p in pruned.items()}
    assert fresh.config.to_dict() == model.config.to_dict()
    refitted = ("o_proj", "down_proj") + (("gate_proj", "up_proj") if extra.get("reconstruct_steps") else ())
    untouched = [n for n in pruned if not n.endswith(tuple(f"{r}.weight" for r in refitted))]
    assert any(pruned[n].shape != tiny_model().get_parameter(n).shape for n in untouched)  # sliced, not refitted
    for n in untouched:
        assert_same(replayed[n], pruned[n], msg=n)
