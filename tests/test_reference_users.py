"""The reference's users: its pickles (--allow_pickle everywhere), scripts/evaluate.sh's argument order,
test_speedup.py's flags, and --add_eos_token off by default."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from cli_helpers import run_cli, script
from conftest import REPO, need_shared


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """prune_log/x/pytorch_model.bin (what the reference's hf_prune.py writes) and a LoRA run in its layout:
    tune_log/x/adapter_config.json + tune_log/x/checkpoint-2/pytorch_model.bin (LoRA weights only)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = need_shared("models", "stories260K")
    root = tmp_path_factory.mktemp("reference")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    (root / "prune_log" / "x").mkdir(parents=True)
    torch.save({"model": model, "tokenizer": tok}, root / "prune_log" / "x" / "pytorch_model.bin")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))
    tune = root / "tune_log" / "x"
    (tune / "checkpoint-2").mkdir(parents=True)
    peft_model.peft_config["default"].save_pretrained(str(tune))
    torch.save(get_peft_model_state_dict(peft_model), tune / "checkpoint-2" / "pytorch_model.bin")
    stories = need_shared("data", "tinystories", "tinystories_val.txt").read_text().split("\n\n")[:40]
    (root / "text.txt").write_text("\n\n".join(stories))
    ids = torch.tensor([[1, 400, 30, 72, 9]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    return {"root": root, "pickle": root / "prune_log" / "x" / "pytorch_model.bin", "tune": tune,
            "base": path, "lora_logits": expected, "ids": ids, "text": root / "text.txt"}


@pytest.mark.slow
def test_every_cli_takes_a_reference_pickle_only_with_allow_pickle(reference_run, tmp_path):
    pickle, text = str(reference_run["pickle"]), str(reference_run["text"])
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Tell a story.", "input": "", "output": "Once upon a time"}] * 4))
    train = ["--prune_model", pickle, "--data_path", str(data), "--output_dir", str(tmp_path / "tune"),
             "--val_set_size", "0", "--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "2",
             "--warmup_steps", "0", "--save_steps", "1", "--device", "cpu"]
    runs = {"post_training.py": train,
            "evaluate.py": ["--checkpoints", f"ref={pickle}", "--tasks", "", "--ppl", text, "--no_stats",
                            "--device", "cpu", "--output_dir", str(tmp_path / "ev")],
            "generate.py": ["--model_type", "pruneLLM", "--ckpt", pickle, "--prompt", "Once upon a time,", "--greedy",
                            "--max_new_tokens", "5", "--device", "cpu"],
            "test_speedup.py": ["--model_type", "pruneLLM", "--ckpt", pickle, "--device", "cpu"]}
    for prog, argv in runs.items():
        status, _, err = run_cli(prog, argv)
        assert status == 2 and "pickled checkpoint" in err and "--allow_pickle" in err, (prog, err)
        status, out, err = run_cli(prog, [*argv, "--allow_pickle"])
        assert status == 0, (prog, err[-2000:])
        if prog == "generate.py":
            assert "Once upon a time, there was a little" in out
        if prog == "test_speedup.py":
            assert "0.2600 M" in out
    assert (tmp_path / "tune" / "adapter" / "adapter_config.json").is_file()
    assert 3 < json.loads((tmp_path / "ev" / "results.json").read_text())["ref"]["ppl"][text] < 10


@pytest.mark.slow
def test_evaluate_sh_takes_the_references_argument_order(reference_run, tmp_path):
    from LLMPruner.evaluate.models import load_for_eval, parse_spec
    from LLMPruner.evaluate.ppl import evaluate_ppl
    base, tune, prune_dir, text = (str(reference_run[k]) for k in ("base", "tune", "pickle", "text"))
    prune_dir = os.path.dirname(prune_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OUT": str(tmp_path), "DATA": "/nonexistent"}
    run = subprocess.run(["bash", "scripts/evaluate.sh", base, tune, prune_dir, "2", "--", "--allow_pickle",
                          "--tasks", "", "--ppl", text, "--no_stats", "--device", "cpu"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["base", "pruned", "lora-2"]
    assert results["lora-2"]["model"] == prune_dir and results["lora-2"]["lora"] == f"{tune}/checkpoint-2"
    # our order names the same checkpoints: BASE PRUNED LORA_RUN_DIR STEP
    model, tok = load_for_eval(parse_spec(f"x={prune_dir}+{tune}/checkpoint-2"), allow_pickle=True)
    with torch.no_grad():  # the reference-layout adapter is the one that was trained
        torch.testing.assert_close(model(reference_run["ids"]).logits, reference_run["lora_logits"],
                                   atol=1e-4, rtol=1e-4)
    assert results["lora-2"]["ppl"][text] == pytest.approx(evaluate_ppl(model, tok, [text], 128)[text], rel=1e-5)
    assert results["base"]["ppl"] == results["pruned"]["ppl"] != results["lora-2"]["ppl"]


def test_add_eos_token_is_off_by_default_as_in_the_reference(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    parse = script("post_training.py").parse_args
    model = str(REPO)  # any existing path: only the flags are parsed here
    assert parse(["--prune_model", model, "--data_path", str(data)]).add_eos_token is False
    assert parse(["--prune_model", model, "--data_path", str(data), "--add_eos_token"]).add_eos_token is True
