"""hf_prune.py never loses work and its run folder never lies (issue 11, items 2 and 3, and the
perplexity printed after pruning): real runs of the script on stories260K in a temporary folder."""
from __future__ import annotations

import json
import os

import pytest

from conftest import need_shared
from test_cli_prune import run

pytestmark = pytest.mark.slow
RUN_FILES = ("args.json", "command.txt", "prune.log", "plan.json", "results.json", "config.json",
             "model.safetensors", "pruning.json")


def fast_args(model, name="llama_prune", ratio="0.25"):
    """l2 scores need no calibration data: each run is a few seconds."""
    return ["--base_model", str(model), "--device", "cpu", "--eval_device", "cpu", "--pruner_type", "l2",
            "--pruning_ratio", ratio, "--block_attention_layer_start", "1", "--block_attention_layer_end", "4",
            "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4", "--save_ckpt_log_name", name,
            "--max_seq_len", "32"]


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in RUN_FILES}


def n_params(folder) -> int:
    from LLMPruner.checkpoint import load_pruned
    model, _ = load_pruned(folder)
    return sum(p.numel() for p in model.parameters())


def test_failing_evaluation_after_pruning_keeps_the_saved_model(tmp_path):
    """Item 2: the model is saved before --test_after_train evaluates (the reference's order)."""
    model = need_shared("models", "stories260K")
    (tmp_path / "no_such_eval.txt").write_text("")  # exists (so the flags pass), but holds no text to score
    proc = run(fast_args(model) + ["--save_model", "--test_after_train",
                                   "--ppl_datasets", str(tmp_path / "no_such_eval.txt")], tmp_path)
    assert proc.returncode != 0 and "no_such_eval.txt" in proc.stderr
    folder = tmp_path / "prune_log" / "llama_prune"
    assert "the pruned model is saved in" in proc.stderr
    results = json.loads((folder / "results.json").read_text())
    assert results["saved_model"] and "ppl_after" not in results
    assert "no_such_eval.txt" in results["evaluation_error"]
    assert n_params(folder) == results["params_after"] < results["params_before"]
    assert len(results["generations"]) == 5  # what did succeed is recorded


def test_a_failed_run_leaves_the_good_run_intact_and_a_good_one_replaces_it_whole(tmp_path):
    """Item 3: run files always describe the weights beside them."""
    model = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    folder = tmp_path / "prune_log" / "llama_prune"
    first = run(fast_args(model) + ["--save_model"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    good = snapshot(folder)

    # fails after loading, once its log has started: calibration text too short for one window (a file with
    # no text at all is refused before anything is written)
    (tmp_path / "short.txt").write_text("Once upon a time.\n")
    failed = run(fast_args(model, ratio="0.5") + ["--save_model", "--pruner_type", "taylor",
                                                 "--calibration_data", str(tmp_path / "short.txt")], tmp_path)
    assert failed.returncode != 0 and "short.txt" in failed.stderr
    assert snapshot(folder) == good
    assert "short.txt" in (folder.parent / "llama_prune.failed" / "prune.log").read_text()
    assert "is unchanged" in failed.stderr
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary siblings left

    # a second good run (another ratio, with evaluation) replaces every file together
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(text.read_text()[:20000])
    second = run(fast_args(model, ratio="0.5") + ["--save_model", "--test_after_train",
                                                 "--ppl_datasets", str(tiny)], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(snapshot(folder)[name] != good[name] for name in ("args.json", "results.json", "model.safetensors"))
    results = json.loads((folder / "results.json").read_text())
    assert json.loads((folder / "args.json").read_text())["pruning_ratio"] == 0.5
    assert n_params(folder) == results["params_after"]
    assert json.loads((folder / "pruning.json").read_text())["provenance"]["params_after"] == results["params_after"]
    # the perplexity after pruning is printed as the reference prints it, and is the one recorded
    line = next(l for l in second.stdout.splitlines() if l.startswith("PPL after pruning: "))
    assert json.loads(line.split(": ", 1)[1]) == {str(tiny): round(results["ppl_after"][str(tiny)], 4)}
    assert "PPL after pruning" in (folder / "prune.log").read_text()
    assert results["ppl_after"][str(tiny)] > 1


def test_run_folder_unit(tmp_path):
    """RunFolder alone: commit replaces whole, abandon keeps the old, a killed commit is restored."""
    from LLMPruner.run_folder import RunFolder
    final = tmp_path / "runs" / "x"
    run1 = RunFolder(final)
    (run1.path / "a.txt").write_text("1")
    assert not final.exists()
    assert run1.commit() == final and (final / "a.txt").read_text() == "1"
    run2 = RunFolder(final)
    (run2.path / "b.txt").write_text("2")
    run2.abandon()
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert (final.parent / "x.failed" / "b.txt").read_text() == "2"
    # a process killed between commit's two renames left only ".x.old-<pid>": the next run restores it
    dead_pid = 2 ** 22 + 12345
    os.replace(final, final.parent / f".x.old-{dead_pid}")
    (final.parent / f".x.tmp-{dead_pid}").mkdir()
    RunFolder(final).abandon()
    assert (final / "a.txt").read_text() == "1"
    assert sorted(p.name for p in final.parent.iterdir()) == ["x", "x.failed"]
