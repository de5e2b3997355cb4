"""PruneConfig (decisions as data, checked in one place), recipes, --config replay and --recipe auto."""
from __future__ import annotations

import json
import sys

import pytest

from cli_helpers import run_cli
from conftest import REPO, need_shared
from LLMPruner.config import ConfigError, PruneConfig, resolve_layer
from LLMPruner.recipe import auto_recipes, load_recipe, recipe_names, recipe_table

sys.path.insert(0, str(REPO))
import hf_prune  # noqa: E402


def test_a_configuration_round_trips_through_json_and_yaml(tmp_path):
    config = PruneConfig()
    config.score.pruner_type = "wanda"
    config.how_much.target_params = 6_000_000_000
    config.what.block_mlp_layer_end = -2
    assert PruneConfig.load(config.save(tmp_path / "c.json")) == config
    pytest.importorskip("yaml")
    assert PruneConfig.load(config.save(tmp_path / "c.yaml")) == config


@pytest.mark.parametrize("change, message", [
    (dict(select=dict(obs_allocation="residual")), "--obs_allocation residual needs --selection obs"),
    (dict(select=dict(selection="obs")), "--selection obs with --compensation none"),
    (dict(score=dict(pruner_type="l3")), "--pruner_type 'l3': choose one of random, l1, l2, taylor"),
    (dict(how_much=dict(pruning_ratio=1.0)), r"--pruning_ratio 1.0: must be in \[0, 1\)"),
    (dict(how_much=dict(param_budget=0.1, target_params="6B")), "both set the budget"),
    (dict(what=dict(prune_experts=4, skip_attention=True)), "drop --skip_attention"),
    (dict(runtime=dict(offload_sequential=True)), "--offload_sequential needs --offload"),
    (dict(compensate=dict(reconstruct_steps=10)), "--reconstruct_steps 10 needs --compensation refit"),
])
def test_validate_names_the_flag_the_value_and_what_is_allowed(change, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig.from_dict(change).validate()


def test_a_file_with_an_unknown_setting_names_it():
    with pytest.raises(ConfigError, match=r"score\.prunr_type is not a setting"):
        PruneConfig.from_dict({"score": {"prunr_type": "l2"}})
    with pytest.raises(ConfigError, match="unknown section 'scores'"):
        PruneConfig.from_dict({"scores": {}})


def test_layer_ends_count_from_the_last_layer_and_starts_may_be_fractions():
    assert resolve_layer(-2, 30, 29) == 28 and resolve_layer(-2, 32, 31) == 30
    assert resolve_layer(0.125, 32, 0) == 4 and resolve_layer(0.125, 30, 0) == 4 and resolve_layer(0.125, 5, 0) == 1
    assert resolve_layer(None, 30, 29) == 29 and resolve_layer(3, 30, 0) == 3


def test_the_command_line_and_its_configuration_say_the_same(tmp_path):
    stories = str(need_shared("models", "stories260K"))
    args = hf_prune.parse_args(["--base_model", stories, "--pruner_type", "taylor", "--channel_wise",
                                "--calibration_data", stories + "/config.json",
                                "--pruning_ratio", "0.3", "--log_dir", str(tmp_path), "--device", "cpu"])
    config = PruneConfig.from_flat(vars(args))
    assert config.what.mode == "channel_wise" and config.score.pruner_type == "taylor"
    back = config.to_args()
    assert all(back[k] == getattr(args, k) for k in back), {k: (back[k], getattr(args, k)) for k in back
                                                           if back[k] != getattr(args, k)}


def test_every_shipped_recipe_is_valid_and_listed_with_its_figures():
    assert {"reference", "fast", "quality", "quality+reconstruct"} <= set(recipe_names())
    table = recipe_table()
    for name in recipe_names():
        recipe = load_recipe(name)
        assert f"{name}: {recipe.summary}" in table and recipe.measured
        assert "pruning_ratio" not in recipe.flags() and "target_params" not in recipe.flags()  # the size is the user's
    assert "68.22 / 113.14" in table and "77.57 / 136.96" in table
    assert [r.name for r in auto_recipes()] == sorted(recipe_names())
    status, out, _ = run_cli("hf_prune.py", ["--list_recipes"])
    assert status == 0 and out.strip() == table


def test_a_recipe_sets_what_the_command_line_does_not(tmp_path):
    stories = str(need_shared("models", "stories260K"))
    base = ["--base_model", stories, "--log_dir", str(tmp_path), "--device", "cpu", "--calibration_data", stories]
    args = hf_prune.parse_args(base + ["--recipe", "quality", "--num_examples", "16"])
    assert (args.selection, args.obs_allocation, args.compensation, args.skip_attention) == ("obs", "residual",
                                                                                              "refit", True)
    assert args.num_examples == 16 and args.calibration_seq_len == 128  # the explicit flag wins, the rest: recipe's
    args = hf_prune.parse_args(base + ["--recipe", "fast", "--calibration_seq=32"])
    assert args.pruner_type == "wanda" and args.calibration_seq_len == 32  # --flag=value, abbreviated, is given
    from LLMPruner.cli import UsageError
    with pytest.raises(UsageError, match="--recipe 'qualty': no such recipe; choose one of fast, quality"):
        hf_prune.parse_args(base + ["--recipe", "qualty"])
    with pytest.raises(UsageError, match="--selection obs with --compensation bias"):
        hf_prune.parse_args(base + ["--recipe", "quality", "--compensation", "bias"])


@pytest.mark.slow
def test_a_runs_configuration_replays_the_same_plan(tmp_path):
    stories = str(need_shared("models", "stories260K"))
    text = str(need_shared("data", "tinystories", "tinystories_val.txt"))
    common = ["--base_model", stories, "--log_dir", str(tmp_path), "--device", "cpu", "--eval_device", "cpu"]
    status, _, err = run_cli("hf_prune.py", common + ["--recipe", "fast", "--target_params", "220000",
                                                      "--calibration_data", text, "--num_examples", "16",
                                                      "--save_ckpt_log_name", "first"])
    assert status == 0, err[-3000:]
    saved = PruneConfig.load(tmp_path / "first" / "prune_config.json")
    assert saved.score.pruner_type == "wanda" and saved.how_much.target_params == 220000
    assert saved.how_much.param_budget is None  # the target is the decision; the budget is this model's
    status, _, err = run_cli("hf_prune.py", common + ["--config", str(tmp_path / "first" / "prune_config.json"),
                                                      "--save_ckpt_log_name", "again"])
    assert status == 0, err[-3000:]
    plans = [json.loads((tmp_path / run / "plan.json").read_text()) for run in ("first", "again")]
    assert plans[0] == plans[1]
    results = json.loads((tmp_path / "first" / "results.json").read_text())
    assert results["recipe"] == "fast" and 220000 <= results["params_after"]


@pytest.mark.slow
def test_auto_prunes_with_each_recipe_and_keeps_the_lowest_heldout_loss(tmp_path):
    stories = str(need_shared("models", "stories260K"))
    text = str(need_shared("data", "tinystories", "tinystories_val.txt"))
    status, out, err = run_cli("hf_prune.py", ["--base_model", stories, "--log_dir", str(tmp_path), "--device", "cpu",
                                               "--eval_device", "cpu", "--recipe", "auto", "--target_params", "220000",
                                               "--calibration_data", text, "--num_examples", "16"])
    assert status == 0, err[-3000:]
    rows = json.loads((tmp_path / "llama_prune" / "recipe_auto.json").read_text())
    assert [r["recipe"] for r in rows] == sorted(recipe_names())
    assert len({r["params"] for r in rows}) == 1  # the same size for every recipe
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["heldout_loss"] == min(r["heldout_loss"] for r in rows)
    results = json.loads((tmp_path / "llama_prune" / "results.json").read_text())
    assert results["recipe"] == chosen[0]["recipe"] and results["params_after"] == chosen[0]["params"]
    assert "--recipe auto: held-out loss of each recipe's model" in out and "| chosen |" in out


def test_one_pipeline_gives_the_same_model_resident_or_streamed(tmp_path):
    """prune_with: the same configuration, in memory and layer by layer (--offload), the same units and weights."""
    import copy

    import torch
    from conftest import tiny_model
    from LLMPruner.pipeline import prune_with
    model = tiny_model(num_hidden_layers=3, seed=3)
    dense = copy.deepcopy(model)
    config = load_recipe("quality").config()  # OBS + residual allocation + refit, MLP only
    config.how_much.param_budget = 0.15
    examples = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    ranges = {"attention_layers": range(0), "mlp_layers": range(0, 3)}
    config.calibration.calibration_batch_size = 4
    resident = prune_with(model, config, examples, ranges=ranges)
    config.runtime.offload = True
    streamed = prune_with(dense, config, examples, ranges=ranges, save_to=tmp_path / "off")
    from test_offload_obs import _same_model
    _same_model(tmp_path, model, streamed, resident)  # the same units, kept indices and weights (rtol 1e-5)
    config.what.query_heads = True
    with pytest.raises(ValueError, match="--offload cannot be combined with --query_heads"):
        prune_with(dense, config, examples)


def test_the_quality_recipe_is_the_readmes_twelve_flag_smollm2_command(tmp_path):
    from types import SimpleNamespace

    from LLMPruner.prune_run import check_against_model
    stories = str(need_shared("models", "stories260K"))  # any local model: nothing is loaded
    calib = str(need_shared("data", "c4", "c4_demo.jsonl"))
    common = ["--base_model", stories, "--calibration_data", calib, "--log_dir", str(tmp_path), "--device", "cpu"]
    long = hf_prune.parse_args(common + [
        "--pruner_type", "l2", "--selection", "obs", "--obs_allocation", "residual", "--compensation", "refit",
        "--param_budget", "0.14996", "--skip_attention", "--block_mlp_layer_start", "4", "--block_mlp_layer_end",
        "28", "--num_examples", "128", "--calibration_seq_len", "128"])
    short = hf_prune.parse_args(common + ["--recipe", "quality", "--param_budget", "0.14996"])
    smollm2 = SimpleNamespace(num_hidden_layers=30, max_position_embeddings=8192)
    assert check_against_model(smollm2, short) == check_against_model(smollm2, long) == \
        {"attention_layers": range(0), "mlp_layers": range(4, 28)}
    differ = {k for k, v in PruneConfig.from_flat(vars(long)).flat().items()
              if PruneConfig.from_flat(vars(short)).flat()[k] != v}
    assert differ == {"block_mlp_layer_start", "block_mlp_layer_end"}  # 4..28 written as 0.125..-2 (any depth)
