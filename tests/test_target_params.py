"""``--target_params``: an absolute parameter count ("8B -> 6B"), turned into the exact ``--param_budget``."""
from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli
from test_cli_prune import run
from conftest import need_shared, tiny_model
from LLMPruner.select.budget import budget_for_target, non_embedding_parameters, parse_count, unit_cost
from LLMPruner.discover import discover
from LLMPruner.prune import prune
from LLMPruner.shrink import count_parameters


@pytest.mark.parametrize("text, count", [("6B", 6 * 10**9), ("118.6M", 118_600_000), ("118589760", 118_589_760),
                                         ("6.5e9", 6_500_000_000), ("750k", 750_000), (" 2G ", 2 * 10**9)])
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["six billion", "6X", "", "-5M", "1.2.3B"])
def test_parse_count_names_the_flag(text):
    with pytest.raises(ValueError, match=r"--target_params .*expected a parameter count such as 6B"):
        parse_count(text)


def test_budget_for_target_by_hand_and_its_limits():
    # 1,000 parameters, 600 of them outside the embeddings: 1000 -> 700 removes 300 = 0.5 of 600 (+ 0.5 / 600)
    assert budget_for_target(1000, 600, 700) == pytest.approx((300 + 0.5) / 600)
    assert int(budget_for_target(1000, 600, 700) * 600) == 300
    for bad in (1000, 1200, 400, 300):
        with pytest.raises(ValueError, match=f"--target_params {bad:,}: must be below the model's 1,000 "
                                             "parameters and above its 400 embedding/head"):
            budget_for_target(1000, 600, bad)


@pytest.mark.parametrize("target_share", [0.9, 0.75])
def test_the_pruned_model_has_the_target_plus_less_than_one_unit(target_share):
    model = tiny_model()
    total, largest = count_parameters(model), max(unit_cost(model, f) for f in discover(model).families
                                                  if f.kind in ("attention", "mlp"))
    target = int(total * target_share)
    prune(model, pruner_type="l2", param_budget=budget_for_target(total, non_embedding_parameters(model), target))
    assert target <= count_parameters(model) < target + largest


def test_cli_target_params_equals_the_budget_run_in_memory_and_under_offload(tmp_path):
    stories = str(need_shared("models", "stories260K"))
    data = need_shared("data")
    common = ["--base_model", stories, "--device", "cpu", "--eval_device", "cpu", "--pruner_type", "l2",
              "--log_dir", str(tmp_path)]
    status, _, err = run_cli("hf_prune.py", common + ["--save_ckpt_log_name", "dense", "--pruning_ratio", "0"])
    assert status == 0, err[-2000:]
    total = json.loads((tmp_path / "dense" / "results.json").read_text())["params_before"]
    target = total - 40_000
    runs = {"target": ["--target_params", str(target)], "offload": ["--target_params", str(target), "--offload",
                                                                    "--calibration_data",
                                                                    str(data / "tinystories" / "tinystories_val.txt")]}
    after = {}
    for name, extra in runs.items():  # a real process: prune.log gets the INFO lines as a user's run does
        proc = run(common + extra + ["--save_ckpt_log_name", name], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        after[name] = json.loads((tmp_path / name / "results.json").read_text())["params_after"]
        assert f"--target_params {target:,}: 40,000 of {total:,} parameters to remove" in \
            (tmp_path / name / "prune.log").read_text()
    budget = json.loads((tmp_path / "target" / "args.json").read_text())["param_budget"]
    status, _, err = run_cli("hf_prune.py", common + ["--param_budget", repr(budget), "--save_ckpt_log_name", "b"])
    assert status == 0, err[-2000:]
    after["budget"] = json.loads((tmp_path / "b" / "results.json").read_text())["params_after"]
    assert after["target"] == after["offload"] == after["budget"]
    assert target <= after["target"] < target + 3 * 64 * 172  # under one unit: an MLP channel is 3 x 64 weights


@pytest.mark.parametrize("extra, message", [
    (["--target_params", "100M"], "--target_params 100,000,000: must be below the model's"),
    (["--target_params", "lots"], "--target_params 'lots': expected a parameter count such as 6B"),
    (["--target_params", "200k", "--param_budget", "0.1"], "--target_params 200k and --param_budget 0.1: both set"),
    (["--target_params", "200k", "--layer_wise", "--layer", "3"], "--layer_wise keeps the first --layer layers"),
])
def test_cli_refuses_what_cannot_be_reached(tmp_path, extra, message):
    stories = str(need_shared("models", "stories260K"))
    status, _, err = run_cli("hf_prune.py", ["--base_model", stories, "--device", "cpu", "--pruner_type", "l2",
                                             "--log_dir", str(tmp_path / "log")] + extra)
    assert status == 2 and message in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "log").exists() or not any((tmp_path / "log").iterdir())


def test_a_budget_beyond_what_the_units_hold_is_refused_and_one_within_is_met_to_one_unit():
    from LLMPruner.select.budget import BudgetError, unit_cost
    from LLMPruner.discover import discover
    from LLMPruner.prune import check_budget
    model = tiny_model()  # 3 layers, MLP 48 channels: one channel costs 3 x 32 parameters
    mlp = [f for f in discover(model).families if f.kind == "mlp" and f.layer in (1, 2)]
    assert {unit_cost(model, f) for f in mlp} == {96}
    capacity = 2 * 47 * 96  # every family keeps one channel
    start = non_embedding_parameters(model)
    check_budget(model, (capacity + 95) / start, "block_wise", range(0), range(1, 3))  # within one unit: met
    with pytest.raises(BudgetError, match=f"asks to remove {capacity + 96:,} parameters.*give only {capacity:,}"):
        check_budget(model, (capacity + 96.5) / start, "block_wise", range(0), range(1, 3))
    n = count_parameters(model)
    prune(model, pruner_type="l2", param_budget=0.05, attention_layers=range(0), mlp_layers=range(1, 3))
    assert 0 <= int(0.05 * start) - (n - count_parameters(model)) < 96  # under by less than one unit
