"""Issue 11 item 5: every bad input of the CLIs is one line naming the flag/file, the value and what is
allowed; usage errors exit 2, runtime failures 1; tracebacks only with --debug / LLMPRUNER_DEBUG=1.

Most cases run the real scripts' ``main`` through the shared handler in this process (cli_helpers);
the process-level behaviour (stderr, exit status, no traceback, offline speed) runs real subprocesses.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from cli_helpers import run_cli, script
from conftest import REPO, need_shared

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("LLMPRUNER_DEBUG", None)


def one_line_error(status: int, err: str, expected_status: int, *needles: str, prog: str) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]  # not logs/bars
    assert status == expected_status, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def stories():
    return str(need_shared("models", "stories260K"))


@pytest.fixture
def bad_models(tmp_path, stories):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("this is not {json")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(stories, corrupt)
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:1000])
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"garbage": (garbage, "not a valid JSON"), "corrupt": (corrupt, "safetensors"),
            "empty": (empty, "not a checkpoint folder"), "missing": (tmp_path / "nope", "no such file or folder")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["garbage", "corrupt", "empty", "missing"])
@pytest.mark.parametrize("prog,flag", [("hf_prune.py", "--base_model"), ("post_training.py", "--prune_model"),
                                       ("evaluate.py", "--checkpoints"), ("generate.py", "--model")])
def test_bad_model_is_named(prog, flag, kind, bad_models, tmp_path):
    path, reason = bad_models[kind]
    value = f"x={path}" if prog == "evaluate.py" else str(path)
    extra = {"hf_prune.py": ["--log_dir", str(tmp_path / "log")],
             "post_training.py": ["--data_path", str(tmp_path / "d.json"), "--output_dir", str(tmp_path / "o")],
             "evaluate.py": ["--tasks", "", "--ppl", "--output_dir", str(tmp_path / "r")],
             "generate.py": ["--prompt", "Once"]}[prog]
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a", "output": "b"}] * 4))
    status, _, err = run_cli(prog, [flag, value, *extra])
    one_line_error(status, err, 2, flag, str(path), reason, prog=prog)


def test_hub_names_offline_say_which_flag_takes_a_local_path(tmp_path, stories):
    cases = [("hf_prune.py", ["--log_dir", str(tmp_path)], "--base_model 'huggyllama/llama-7b'", "--base_model ../"),
             ("hf_prune.py", ["--base_model", stories, "--pruner_type", "taylor", "--log_dir", str(tmp_path)],
              "--calibration_data 'bookcorpus'", ".jsonl"),
             ("hf_prune.py", ["--base_model", stories, "--test_after_train", "--log_dir", str(tmp_path)],
              "--ppl_datasets 'wikitext2'", "--eval_data_dir"),
             ("post_training.py", ["--prune_model", stories, "--output_dir", str(tmp_path)],
              "--data_path 'yahma/alpaca-cleaned'", "--data_path ../shared/data/alpaca"),
             ("evaluate.py", ["--checkpoints", f"b={stories}", "--tasks", "", "--output_dir", str(tmp_path)],
              "--ppl 'wikitext2'", "--data_dir"),
             ("generate.py", ["--model", "HuggingFaceTB/SmolLM2-135M"], "--model 'HuggingFaceTB/SmolLM2-135M'",
              "--model ../shared")]
    for prog, argv, named, hint in cases:
        status, _, err = run_cli(prog, argv)
        one_line_error(status, err, 2, named, "unreachable", hint, prog=prog)


def test_devices_default_to_the_machine_and_an_unavailable_one_is_named(tmp_path, stories):
    from LLMPruner import cli
    from cli_helpers import script
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    args = script("hf_prune.py").parse_args(["--base_model", stories, "--log_dir", str(tmp_path)])
    assert (args.device, args.eval_device) == (expected, expected)
    with pytest.raises(cli.UsageError, match="--device cuda:x: not a device|--device 'cuda:x': not a device"):
        cli.check_device("--device", "cuda:x")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the unavailable-device error cannot be shown")
    for prog, flag, argv in [("hf_prune.py", "--eval_device", ["--base_model", stories, "--log_dir", str(tmp_path)]),
                             ("post_training.py", "--device", ["--prune_model", stories, "--data_path",
                                                               str(tmp_path / "d.json")]),
                             ("evaluate.py", "--device", ["--checkpoints", f"b={stories}", "--tasks", ""]),
                             ("generate.py", "--device", ["--model", stories])]:
        status, _, err = run_cli(prog, [*argv, flag, "cuda"])
        one_line_error(status, err, 2, f"{flag} cuda", "CUDA is not available", f"{flag} cpu", prog=prog)


def test_sizes_of_zero_and_duplicate_names_are_refused(tmp_path, stories):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 4))
    base = ["--checkpoints", f"b={stories}", "--tasks", "", "--output_dir", str(tmp_path)]
    cases = [("hf_prune.py", ["--base_model", stories, "--max_seq_len", "0"], "--max_seq_len 0: must be >= 1"),
             ("hf_prune.py", ["--base_model", stories, "--calibration_seq_len", "0"], "--calibration_seq_len 0"),
             ("evaluate.py", [*base, "--limit", "0"], "--limit 0: must be >= 1"),
             ("evaluate.py", [*base, "--max_seq_len", "0"], "--max_seq_len 0: must be >= 1"),
             ("evaluate.py", ["--checkpoints", f"a={stories}", f"a={stories}+{tmp_path}", "--tasks", ""],
              "are both named 'a'"),
             ("post_training.py", ["--prune_model", stories, "--data_path", str(data), "--num_epochs", "0"],
              "--num_epochs 0.0: must be > 0"),
             ("post_training.py", ["--prune_model", stories, "--data_path", str(data), "--micro_batch_size", "0"],
              "--micro_batch_size 0: must be >= 1"),
             ("generate.py", ["--model", stories, "--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
             ("generate.py", ["--model_type", "tune_prune_LLM", "--ckpt", stories], "needs --lora_ckpt")]
    for prog, argv, message in cases:
        status, _, err = run_cli(prog, argv)
        one_line_error(status, err, 2, message, prog=prog)


def test_unwritable_output_folders_are_refused_before_loading(tmp_path, stories):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for folder, why in [(a_file / "sub", "is a file"), (a_file, "not a folder"), ("/proc/llmpruner", "cannot write")]:
        status, _, err = run_cli("hf_prune.py", ["--base_model", stories, "--log_dir", str(folder)])
        one_line_error(status, err, 2, f"--log_dir {str(folder)!r}", why, prog="hf_prune.py")
        status, _, err = run_cli("evaluate.py", ["--checkpoints", f"b={stories}", "--tasks", "", "--ppl",
                                                 "--output_dir", str(folder)])
        one_line_error(status, err, 2, "--output_dir", why, prog="evaluate.py")


@pytest.mark.slow
def test_a_full_disk_says_so_with_status_1(tmp_path, stories):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to produce a real ENOSPC")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to("/dev/full")  # every write there fails with ENOSPC
    status, _, err = run_cli("evaluate.py", ["--checkpoints", f"b={stories}", "--tasks", "", "--ppl",
                                             "--no_stats", "--device", "cpu", "--output_dir", str(out), "--overwrite"])
    one_line_error(status, err, 1, "no space left", "the disk is full", prog="evaluate.py")


@pytest.mark.slow
def test_every_data_file_problem_is_named(tmp_path, stories):
    files = {"missing.json": None, "empty.json": "", "garbage.json": "[{not json", "schema.json": '[{"foo": 1}]',
             "list.json": '{"foo": 1}'}
    for name, text in files.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    expect = {"missing.json": "no such file", "empty.json": "empty", "garbage.json": "not valid JSON",
              "schema.json": "expected the Alpaca schema", "list.json": "expected a JSON list"}
    for name, why in expect.items():
        status, _, err = run_cli("post_training.py", ["--prune_model", stories, "--data_path", str(tmp_path / name),
                                                      "--output_dir", str(tmp_path / "o"), "--val_set_size", "0"])
        one_line_error(status, err, 2, f"--data_path '{tmp_path / name}'", why, prog="post_training.py")
    expect = {"missing.json": "no such file or folder", "empty.json": "the file holds no text", "garbage.json": "not valid JSON",
              "schema.json": "no 'text' field"}
    for name, why in expect.items():
        status, _, err = run_cli("hf_prune.py", ["--base_model", stories, "--pruner_type", "taylor",
                                                 "--calibration_data", str(tmp_path / name), "--device", "cpu",
                                                 "--log_dir", str(tmp_path / "log")])
        one_line_error(status, err, 2, f"--calibration_data '{tmp_path / name}'", why, prog="hf_prune.py")
    status, _, err = run_cli("evaluate.py", ["--checkpoints", f"b={stories}", "--tasks", "", "--ppl",
                                             str(tmp_path / "missing.txt")])
    one_line_error(status, err, 2, "--ppl", "missing.txt", "nor a text file", prog="evaluate.py")
    (tmp_path / "short.txt").write_text("Once upon a time.")
    status, _, err = run_cli("evaluate.py", ["--checkpoints", f"b={stories}", "--tasks", "", "--ppl",
                                             str(tmp_path / "short.txt"), "--no_stats", "--device", "cpu",
                                             "--output_dir", str(tmp_path / "ev")])
    one_line_error(status, err, 2, "--ppl", "short.txt", "fewer than one window of 128", prog="evaluate.py")


def test_explain_sorts_failures_into_usage_and_runtime():
    import errno

    from LLMPruner import cli
    assert cli.explain(OSError(errno.ENOSPC, "No space left on device", "/x/y"), [])[0] == 1
    assert cli.explain(PermissionError(errno.EACCES, "Permission denied", "/x"), [])[0] == 2
    assert cli.explain(ValueError("file 'a.txt' is bad"), ["--calibration_data", "a.txt"]) == \
        (2, "--calibration_data 'a.txt': file 'a.txt' is bad")
    status, message = cli.explain(ZeroDivisionError("boom"), [])
    assert status == 1 and "ZeroDivisionError: boom" in message and "--debug" in message
    assert cli.explain(ValueError("two\nlines"), [])[1] == "two lines"


def test_a_flag_is_blamed_only_for_a_value_the_message_quotes_whole():
    from LLMPruner import cli
    gpt2 = "model type 'gpt2' has no adapter; supported: ernie4_5, llama"
    assert cli.explain(ValueError(gpt2), ["--model", "m", "--max_new_tokens", "5"]) == (2, gpt2)  # 5 in ernie4_5
    dtype = "Invalid device string: 'float32'"
    assert cli.explain(ValueError(dtype), ["--max_seq_len", "32"]) == (2, dtype)  # 32 in float32
    assert cli.explain(ValueError("need at least 5 tokens"), ["--max_new_tokens", "5"])[1] == \
        "--max_new_tokens '5': need at least 5 tokens"


def test_tracebacks_only_with_debug_flag_or_env(tmp_path, bad_models, monkeypatch):
    garbage = str(bad_models["garbage"][0])
    argv = ["--checkpoints", f"a={garbage}", "--tasks", "", "--ppl", "--output_dir", str(tmp_path)]
    status, _, err = run_cli("evaluate.py", argv)
    assert status == 2 and "Traceback" not in err
    status, _, err = run_cli("evaluate.py", [*argv, "--debug"])
    assert status == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("evaluate.py: error: --checkpoints")
    monkeypatch.setenv("LLMPRUNER_DEBUG", "1")
    status, _, err = run_cli("evaluate.py", argv)
    assert status == 2 and "Traceback (most recent call last)" in err


@pytest.mark.slow
def test_an_unreachable_hub_fails_in_seconds_in_one_line_without_offline_mode(tmp_path, monkeypatch):
    """No offline switch, no Hub: one line, exit 2, in seconds (the libraries retry for ~28 s)."""
    from LLMPruner import cli
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable on any machine
    monkeypatch.setattr(cli, "_REACHABLE", None)
    script("hf_prune.py")  # imported before the clock starts
    start = time.perf_counter()
    status, _, err = run_cli("hf_prune.py", ["--log_dir", str(tmp_path)])
    assert time.perf_counter() - start < 10
    one_line_error(status, err, 2, "--base_model 'huggyllama/llama-7b'", "no network connection",
                   "--base_model ../shared", prog="hf_prune.py")
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    run = subprocess.run([sys.executable, "hf_prune.py", "--log_dir", str(tmp_path)], cwd=REPO,
                         env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, capture_output=True, text=True,
                         timeout=300)  # a real process: stderr is exactly that one line
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("hf_prune.py: error: --base_model 'huggyllama/llama-7b'")


@pytest.mark.parametrize("script, flag", [("hf_prune.py", "--base_model"), ("export.py", "--model")])
def test_a_typo_in_a_local_path_is_a_missing_path_not_a_hub_name(tmp_path, monkeypatch, script, flag):
    (tmp_path / "prune_log" / "llama_prune").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    argv = [flag, "prune_log/llama_prnue"] + (["--outfile", "x.gguf"] if script == "export.py" else [])
    start = time.perf_counter()
    status, _, err = run_cli(script, argv)
    assert status == 2 and "Hub" not in err, err
    assert f"{flag} 'prune_log/llama_prnue': no such file or folder (did you mean 'prune_log/llama_prune'?)" in err
    assert time.perf_counter() - start < 5  # no Hub retries
