"""hf_prune.py end to end in a temporary folder, and its one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, need_shared

SEED_EXAMPLE = ["--pruning_ratio", "0.25", "--device", "cpu", "--eval_device", "cpu", "--block_wise",
                "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4", "--block_attention_layer_start",
                "1", "--block_attention_layer_end", "4", "--save_ckpt_log_name", "llama_prune",
                "--pruner_type", "taylor", "--taylor", "param_first", "--test_after_train"]


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "hf_prune.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_seed_example_runs_and_saves(tmp_path):
    model = need_shared("models", "stories260K")
    data = need_shared("data")
    tiny = tmp_path / "tiny.txt"  # a short evaluation text keeps the test fast
    tiny.write_text((data / "tinystories" / "tinystories_val.txt").read_text()[:20000])
    proc = run(SEED_EXAMPLE + ["--base_model", str(model), "--save_model", "--test_before_train",
                               "--calibration_data", str(data / "tinystories" / "tinystories_val.txt"),
                               "--ppl_datasets", str(tiny)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "prune_log" / "llama_prune"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["params_after"] < results["params_before"]
    assert results["ppl_after"][str(tiny)] > results["ppl_before"][str(tiny)] > 1
    assert len(results["generations"]) == 5
    # each figure says which text and windows it is (the README's tables use other windows)
    assert results["ppl_text"][str(tiny)].startswith(f"the file {tiny}, whole") and "128-token windows" in \
        results["ppl_text"][str(tiny)]
    assert f"  {tiny}: the file {tiny}, whole" in proc.stdout
    assert "hf_prune.py" in (run_dir / "command.txt").read_text()
    assert "#Param before" in (run_dir / "prune.log").read_text()
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan[0]["removed_units"]["attention@1"]
    assert (run_dir / "model.safetensors").exists() or (run_dir / "model.safetensors.index.json").exists()
    assert not list(run_dir.glob("*.bin"))


@pytest.mark.parametrize("extra, message", [
    (["--pruning_ratio", "1.0"], "--pruning_ratio 1.0: must be in [0, 1)"),
    (["--block_attention_layer_start", "2", "--block_attention_layer_end", "9"],
     "--block_attention_layer_start/_end = 2..9"),
    (["--block_mlp_layer_start", "3", "--block_mlp_layer_end", "3"], "--block_mlp_layer_start/_end = 3..3"),
    (["--pruner_type", "l3"], "argument --pruner_type: invalid choice: 'l3'"),
    (["--layer_wise", "--layer", "0"], "--layer 0: must be between 1 and 5"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, extra, message):
    model = need_shared("models", "stories260K")
    proc = run(["--base_model", str(model), "--device", "cpu", "--eval_device", "cpu",
                "--block_attention_layer_start", "1", "--block_attention_layer_end", "4",
                "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4"] + extra, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "prune_log").exists()


def test_missing_model_path(tmp_path):
    proc = run(["--base_model", str(tmp_path / "nope"), "--device", "cpu"], tmp_path)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "prune_log").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(folder)
    proc = run(["--base_model", str(folder), "--device", "cpu"], tmp_path)
    assert proc.returncode == 2
    from LLMPruner.adapters import supported_model_types
    assert ("model_type='gpt2' has no LLMPruner adapter; supported: " + ", ".join(supported_model_types())
            in proc.stderr)


def test_budget_refit_and_depth_flags_end_to_end(tmp_path):
    model = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    proc = run(["--base_model", str(model), "--device", "cpu", "--eval_device", "cpu", "--pruner_type", "wanda",
                "--param_budget", "0.3", "--compensation", "refit", "--prune_layers", "1", "--num_examples", "16",
                "--calibration_data", str(text), "--save_model", "--save_ckpt_log_name", "beyond"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "prune_log" / "beyond"
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["structure"]["layers"]) == 4
    assert 0.6 < results["ratio"] < 0.85  # 30% of the non-embedding parameters (embeddings stay)
    from LLMPruner.checkpoint import load_pruned
    loaded, _ = load_pruned(run_dir)
    assert loaded.config.num_hidden_layers == 4
