"""The project's best-measured setting under ``--offload``: structured OBS selection, its layer allocation
and the local reconstruction run in the layer-streamed pass and give the in-memory model (same units, same
weights), and the selection flags that ``--offload`` used to drop silently now mean what they mean in memory
or are refused."""
import copy
import json

import pytest
import torch

from cli_helpers import run_cli
from conftest import need_shared, tiny_model
from LLMPruner import prune, save_pruned
from LLMPruner.score.activations import consumers
from LLMPruner.discover import discover
from LLMPruner.select.allocation import layer_grams
from LLMPruner.stream.allocation import streamed_grams
from LLMPruner.stream.apply import PassOptions
from LLMPruner.stream.discover import discover_streamed
from LLMPruner.stream.pipeline import open_model, prune_offloaded
from test_cli_prune import run
from test_offload_sequential import _tensors

EXAMPLES = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(0))
MLP_ONLY = dict(attention_layers=range(0), mlp_layers=range(0, 4))


def _same_model(tmp_path, model, streamed, in_memory):
    save_pruned(model, None, tmp_path / "mem")
    assert streamed.plan.removed_units == in_memory.plans[-1].removed_units
    assert streamed.plan.keep == in_memory.plans[-1].keep and streamed.plan.keep
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "off")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def _pair_model(seed=5, layers=4, tied=False):
    """Layer 2's MLP channels in identical pairs: half of them cost ~nothing, so an allocation moves units."""
    model = tiny_model(num_hidden_layers=layers, seed=seed, tie_word_embeddings=tied)
    mlp = model.model.layers[2].mlp
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[1::2] = lin.weight[0::2]
        mlp.down_proj.weight[:, 1::2] = mlp.down_proj.weight[:, 0::2]
    return model


def test_streamed_allocation_statistics_equal_the_in_memory_ones():
    model = tiny_model(num_hidden_layers=3, seed=1)
    fams = [f for f in discover(model).families if f.kind == "mlp" and f.layer in (0, 2)]
    cons = consumers(model, fams)
    mem = list(layer_grams(model, cons, EXAMPLES, 4))
    skel, source = open_model(model)
    skel_fams = [f for f in discover_streamed(skel).families if f.kind == "mlp" and f.layer in (0, 2)]
    off = list(streamed_grams(skel, source, skel_fams, EXAMPLES, PassOptions(batch_size=4)))
    assert [i for i, _, _ in off] == [i for i, _, _ in mem] == [0, 2]
    for (_, gm, em), (_, go, eo) in zip(mem, off):
        assert set(gm) == set(go)
        for k in gm:
            torch.testing.assert_close(go[k], gm[k], rtol=1e-6, atol=1e-8)
        assert eo == pytest.approx(em, rel=1e-6)
    assert all(p.is_meta for p in skel.parameters())  # every layer released again


@pytest.mark.parametrize("how", ["uniform", "residual"])
def test_offloaded_obs_is_the_in_memory_obs(tmp_path, how):
    model = _pair_model()
    dense = copy.deepcopy(model)
    common = dict(pruner_type="l2", param_budget=0.2, compensation="refit", selection="obs", obs_allocation=how,
                  examples=EXAMPLES, calibration_batch_size=4, **MLP_ONLY)
    in_memory = prune(model, **common)
    streamed = prune_offloaded(dense, save_to=tmp_path / "off", **common)
    _same_model(tmp_path, model, streamed, in_memory)
    counts = {k: len(v) for k, v in streamed.plan.removed_units.items()}
    if how == "residual":  # the allocation ran: the cheap layer loses more than a uniform share
        assert counts["mlp@2"] > max(counts[k] for k in counts if k != "mlp@2")


@pytest.mark.parametrize("tied", [False, True])
def test_offloaded_obs_with_reconstruction_and_heads_is_the_in_memory_run(tmp_path, tied):
    """Per-layer wanda counts (no scores needed for them), OBS on KV groups and MLP channels, Adam steps."""
    model = tiny_model(num_hidden_layers=3, seed=2, tie_word_embeddings=tied)
    dense = copy.deepcopy(model)
    common = dict(pruner_type="wanda", pruning_ratio=0.5, compensation="refit", selection="obs",
                  reconstruct_steps=8, examples=EXAMPLES, calibration_batch_size=4,
                  attention_layers=range(1, 3), mlp_layers=range(0, 3))
    in_memory = prune(model, **common)
    streamed = prune_offloaded(dense, save_to=tmp_path / "off", **common)
    _same_model(tmp_path, model, streamed, in_memory)
    assert any(k.startswith("attention") and v for k, v in streamed.plan.removed_units.items())


@pytest.mark.parametrize("kw", [dict(pruner_type="l2", pruning_ratio=0.4, unit_rounding="nearest",
                                     attention_layers=range(0, 3), mlp_layers=range(0, 3)),
                                dict(pruner_type="l2", param_budget=0.3, budget_criterion="per_param"),
                                dict(pruner_type="l2", param_budget=0.3, compensation="bias")],
                         ids=["nearest", "per_param", "budget+bias"])
def test_selection_flags_mean_under_offload_what_they_mean_in_memory(tmp_path, kw):
    """--offload used to ignore --unit_rounding / --budget_criterion and the bias parameters of a budget."""
    model = tiny_model(num_hidden_layers=3, seed=4)
    dense = copy.deepcopy(model)
    common = dict(examples=EXAMPLES, calibration_batch_size=4, **kw)
    in_memory = prune(model, **common)
    streamed = prune_offloaded(dense, save_to=tmp_path / "off", **common)
    _same_model(tmp_path, model, streamed, in_memory)
    default = prune_offloaded(copy.deepcopy(dense), **{**common, **{k: v for k, v in
                              dict(unit_rounding="reference", budget_criterion="uniform", compensation="none").items()
                              if k in kw}})
    assert default.plan.removed_units != streamed.plan.removed_units  # the flag changed something


@pytest.mark.parametrize("kw,message", [
    (dict(sequential=True), "--offload_sequential with --selection obs"),
])
def test_offloaded_obs_refuses_what_needs_the_whole_model(kw, message):
    with pytest.raises(ValueError, match=message):
        prune_offloaded(tiny_model(), pruner_type="l2", param_budget=0.2, compensation="refit", selection="obs",
                        examples=EXAMPLES, **MLP_ONLY, **kw)


@pytest.mark.parametrize("extra,message", [
    (["--query_heads"], "--offload cannot be combined with --query_heads"),
    (["--selection", "obs", "--compensation", "refit", "--offload_sequential"],
     "--offload_sequential with --selection obs"),
])
def test_cli_refuses_offload_combinations_in_one_line(tmp_path, extra, message):
    argv = ["--base_model", str(tmp_path), "--log_dir", str(tmp_path / "log"), "--offload", *extra]
    status, _, err = run_cli("hf_prune.py", argv)
    assert status == 2 and message in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "log").exists()


@pytest.mark.slow
def test_cli_offloaded_recommended_setting_equals_the_in_memory_run(tmp_path):
    """hf_prune.py --offload with OBS, the residual allocation and reconstruction on stories260K (streamed from
    its safetensors file): the in-memory run's plan, weights and perplexity."""
    model = need_shared("models", "stories260K")
    data = need_shared("data")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text((data / "tinystories" / "tinystories_val.txt").read_text()[:8000])
    common = ["--base_model", str(model), "--calibration_data", str(data / "tinystories" / "tinystories_val.txt"),
              "--ppl_datasets", str(tiny), "--device", "cpu", "--eval_device", "cpu", "--pruner_type", "l2",
              "--param_budget", "0.2", "--skip_attention", "--block_mlp_layer_start", "0", "--block_mlp_layer_end",
              "5", "--compensation", "refit", "--selection", "obs", "--obs_allocation", "residual",
              "--reconstruct_steps", "8", "--num_examples", "32", "--calibration_seq_len", "64",
              "--test_after_train"]
    for name, extra in {"mem": ["--save_model"], "off": ["--offload", "--max_memory", "1GB"]}.items():
        proc = run(common + extra + ["--save_ckpt_log_name", name], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = {name: tmp_path / "prune_log" / name for name in ("mem", "off")}
    plans = [json.loads((f / "plan.json").read_text()) for f in folders.values()]
    assert plans[0] == plans[1]  # kept indices and units: either plan replays the structure
    assert any(plans[0][0]["removed_units"].values())
    a, b = (_tensors(f) for f in folders.values())
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    results = [json.loads((f / "results.json").read_text()) for f in folders.values()]
    assert results[0]["params_after"] == results[1]["params_after"] < results[0]["params_before"]
    assert results[1]["ppl_after"][str(tiny)] == pytest.approx(results[0]["ppl_after"][str(tiny)], rel=1e-4)
    log = (folders["off"] / "prune.log").read_text()
    assert "OBS allocation (residual)" in log and "reconstruction" in log


def test_offloaded_obs_in_bfloat16_with_states_on_disk_saves_a_model_that_loads(tmp_path):
    """The user's large-model run: bfloat16 layers, boundary states in files, allocation and reconstruction;
    the saved model has the planned shapes and finite logits, and the temporary state files are gone."""
    from LLMPruner import load_pruned
    common = dict(pruner_type="l2", param_budget=0.2, compensation="refit", selection="obs",
                  obs_allocation="residual", reconstruct_steps=4, examples=EXAMPLES, calibration_batch_size=4,
                  **MLP_ONLY)
    streamed = prune_offloaded(_pair_model(), save_to=tmp_path / "off", dtype=torch.bfloat16,
                               offload_states_to_disk=True, **common)
    model, _ = load_pruned(tmp_path / "off")
    kept = {i: layer.mlp.down_proj.in_features for i, layer in enumerate(model.model.layers)}
    assert kept == {i: 48 - len(streamed.plan.removed_units.get(f"mlp@{i}", [])) for i in range(4)}
    assert sum(48 - k for k in kept.values()) > 0
    assert torch.isfinite(model(EXAMPLES[:2]).logits).all()
    assert not list(tmp_path.glob("**/llmpruner-states-*")) and not list((tmp_path / "off").glob(".llmpruner-*"))
