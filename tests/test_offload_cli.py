"""hf_prune.py --offload / --device_map end to end on stories260K in a temporary folder, against the
in-memory run with the same flags, and the one-line errors of the new flags."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import need_shared
from test_cli_prune import run

FLAGS = ["--pruning_ratio", "0.5", "--device", "cpu", "--eval_device", "cpu", "--block_mlp_layer_start", "0",
         "--block_mlp_layer_end", "5", "--block_attention_layer_start", "1", "--block_attention_layer_end", "4",
         "--pruner_type", "taylor", "--taylor", "param_first", "--num_examples", "8"]


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_offload_and_device_map_runs_equal_the_in_memory_run(tmp_path):
    model = need_shared("models", "stories260K")
    data = need_shared("data")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text((data / "tinystories" / "tinystories_val.txt").read_text()[:8000])
    common = FLAGS + ["--base_model", str(model), "--calibration_data",
                      str(data / "tinystories" / "tinystories_val.txt"), "--ppl_datasets", str(tiny)]
    runs = {"mem": ["--save_model", "--test_after_train"],
            "off": ["--offload", "--max_memory", "1GB", "--offload_states_to_disk", "--test_after_train"],
            "map": ["--save_model", "--device_map", "auto", "--max_memory", "1GB"]}
    for name, extra in runs.items():
        proc = run(common + extra + ["--save_ckpt_log_name", name], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = {name: tmp_path / "prune_log" / name for name in runs}
    plans = {name: json.loads((f / "plan.json").read_text()) for name, f in folders.items()}
    assert plans["off"] == plans["mem"] == plans["map"]
    weights = {name: _tensors(f) for name, f in folders.items()}
    for name in ("off", "map"):
        assert set(weights[name]) == set(weights["mem"])
        for k, v in weights["mem"].items():
            torch.testing.assert_close(weights[name][k], v, rtol=1e-5, atol=1e-6, msg=k)
    results = {name: json.loads((f / "results.json").read_text()) for name, f in folders.items()}
    assert results["off"]["params_after"] == results["mem"]["params_after"]
    assert abs(results["off"]["ppl_after"][str(tiny)] - results["mem"]["ppl_after"][str(tiny)]) < 1e-3
    stages = results["off"]["stages"]
    assert {"discover", "score", "prune+write (layers)", "save"} <= set(stages)
    assert all(s["peak_host_rss_mb"] > 0 for s in stages.values())
    # the whole process's peak, which the per-stage resets of VmHWM would otherwise hide, is at least each stage's
    assert stages["whole process"]["peak_host_rss_mb"] >= max(s["peak_host_rss_mb"] for s in stages.values()) - 4
    log = (folders["off"] / "prune.log").read_text()
    assert "peak host RSS" in log and "largest part" in log


@pytest.mark.parametrize("extra, message", [
    (["--offload", "--layer_wise"], "--offload cannot be combined with --layer_wise"),
    (["--offload", "--max_memory", "lots"], "--max_memory 'lots': expected a size such as 8GB"),
    (["--device_map", "gpu-please"], "--device_map 'gpu-please': choose auto"),
    (["--offload_sequential"], "--offload_sequential needs --offload"),
    (["--max_memory", "8GB"], "--max_memory 8GB needs --offload or --device_map"),
])
def test_bad_offload_flags_are_one_clear_line(tmp_path, extra, message):
    model = need_shared("models", "stories260K")
    proc = run(["--base_model", str(model), "--device", "cpu"] + extra, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "prune_log").exists()


@pytest.mark.slow
def test_offload_sequential_logs_both_candidates_and_keeps_one(tmp_path):
    model = need_shared("models", "stories260K")
    data = need_shared("data")
    flags = [f for f in FLAGS] + ["--base_model", str(model), "--calibration_data",
                                  str(data / "tinystories" / "tinystories_val.txt"), "--offload",
                                  "--offload_sequential", "--compensation", "bias", "--save_ckpt_log_name", "seq"]
    flags[flags.index("taylor", flags.index("--pruner_type"))] = "wanda"
    proc = run(flags, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "prune_log" / "seq"
    log = (folder / "prune.log").read_text()
    found = re.search(r"calibration loss ([\d.]+) sequential, ([\d.]+) one-shot: keeping the (\S+) model", log)
    assert found, log[-2000:]
    seq, one, kept = float(found[1]), float(found[2]), found[3]
    assert kept == ("one-shot" if one < seq else "sequential")
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no candidate left behind
    from LLMPruner import load_pruned
    pruned, _ = load_pruned(folder)
    assert any(n.endswith("down_proj.bias") for n, _ in pruned.named_parameters())
