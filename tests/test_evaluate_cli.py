"""Generation, checkpoint specs, the report, and the real CLIs (evaluate.py, generate.py) on stories260K."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, need_shared, tiny_model
from LLMPruner.evaluate.generate import SamplingConfig, generate
from LLMPruner.evaluate.models import parse_spec
from LLMPruner.evaluate.report import markdown_table

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_greedy_generation_of_the_real_model_tells_its_story():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = need_shared("models", "stories260K")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    out = generate(model, tok, ["Once upon a time"], SamplingConfig(max_new_tokens=12, do_sample=False))
    assert out[0].startswith(", there was a little girl named Lily")
    sampled = [generate(model, tok, ["Once"], SamplingConfig(max_new_tokens=16, seed=s))[0] for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded sampling is reproducible, and does sample


def test_bad_sampling_flags_and_specs_are_named():
    with pytest.raises(ValueError, match="--temperature 0"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="--top_p 1.5"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(FileNotFoundError, match="LoRA folder 'nope/dir'"):
        parse_spec("x=model+nope/dir")
    spec = parse_spec("pruned=out/pruned")
    assert (spec.name, spec.model, spec.lora) == ("pruned", "out/pruned", None)


def test_markdown_table_has_every_number():
    results = {"base": {"ppl": {"wikitext2": 12.6}, "zeroshot": {"boolq": {"acc": 0.5}, "piqa": {"acc": 0.7, "acc_norm": 0.75}},
                        "average": {"acc": 0.6, "acc_norm": 0.625}, "stats": {"params": 1000, "macs_total": 5e6}}}
    table = markdown_table(results)
    for cell in ("12.60", "0.5000/-", "0.7000/0.7500", "0.6000/0.6250", "1,000", "5e+06"):
        assert cell in table, (cell, table)


def test_evaluate_cli_writes_one_table_for_two_checkpoints(tmp_path):
    model = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    cmd = [sys.executable, "evaluate.py", "--checkpoints", f"base={model}", f"again={model}",
           "--ppl", str(text), "--tasks", "piqa", "--zeroshot_dir", str(need_shared("data", "zeroshot")),
           "--limit", "8", "--output_dir", str(tmp_path), "--no_latency", "--device", "cpu"]
    run = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["base", "again"]
    assert results["base"]["ppl"] == results["again"]["ppl"]
    assert 4.5 < results["base"]["ppl"][str(text)] < 6.5  # the README's dense figure is ~5.37
    assert results["base"]["stats"]["params"] == 260_032
    assert "| base |" in (tmp_path / "results.md").read_text()


def test_evaluate_cli_rejects_unknown_task_before_loading(tmp_path):
    cmd = [sys.executable, "evaluate.py", "--checkpoints", "base=/no/such/model", "--tasks", "hellaswagg"]
    run = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "unknown task 'hellaswagg'. Did you mean hellaswag" in run.stderr


def test_evaluate_cli_keeps_an_earlier_runs_results_unless_told_to_overwrite(tmp_path):
    from cli_helpers import run_cli
    stories = need_shared("models", "stories260K")
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a girl. " * 40)
    argv = ["--checkpoints", f"base={stories}", "--ppl", str(text), "--tasks", "", "--no_stats", "--device", "cpu",
            "--output_dir", str(tmp_path / "out")]
    assert run_cli("evaluate.py", argv)[0] == 0
    first = (tmp_path / "out" / "results.md").read_text()
    status, _, err = run_cli("evaluate.py", argv)
    assert status == 2 and "holds results.json and results.md of an earlier run" in err and "--overwrite" in err
    assert (tmp_path / "out" / "results.md").read_text() == first
    assert run_cli("evaluate.py", argv + ["--overwrite"])[0] == 0


def test_generate_cli_greedy(tmp_path):
    model = need_shared("models", "stories260K")
    cmd = [sys.executable, "generate.py", "--model", str(model), "--prompt", "Once upon a time",
           "--greedy", "--max_new_tokens", "10", "--device", "cpu"]
    run = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Once upon a time, there was a little girl" in run.stdout


def test_pruned_plus_lora_spec_merges_the_adapter(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from LLMPruner.evaluate.models import load_for_eval
    path = need_shared("models", "stories260K")
    base, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    base.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "tune" / "checkpoint-2")
    ids = torch.tensor([[1, 400, 30, 72, 9]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        merged, _ = load_for_eval(parse_spec(f"lora={tmp_path / 'model'}+{tmp_path / 'tune' / 'checkpoint-2'}"))
        plain, _ = load_for_eval(parse_spec(f"plain={tmp_path / 'model'}"))
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-3)  # the adapter changes outputs
