"""post_training.py with knowledge distillation on the real stories260K, pruned at 0.25 in a tmp folder:
LoRA + KD and full + KD end to end (saved checkpoints reload, evaluate.py reads them), flag errors, and two
gloo processes taking the same steps as one."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, STORIES, need_shared
from test_recover_cli import ENV, LAUNCHERS, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    need_shared("models", "stories260K")
    if not (REPO / "hf_prune.py").is_file():
        pytest.skip("hf_prune.py (the pruning entry point) is not in this checkout")
    folder = tmp_path_factory.mktemp("prune")
    run([sys.executable, "hf_prune.py", "--pruning_ratio", "0.25", "--device", "cpu", "--eval_device", "cpu",
         "--block_wise", "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4",
         "--block_attention_layer_start", "1", "--block_attention_layer_end", "4", "--pruner_type", "taylor",
         "--base_model", str(STORIES), "--calibration_data",
         str(need_shared("data", "tinystories", "tinystories_val.txt")), "--log_dir", str(folder),
         "--save_ckpt_log_name", "p", "--save_model"])
    return folder / "p"


@pytest.fixture(scope="module")
def stories_text(tmp_path_factory):
    text = need_shared("data", "tinystories", "tinystories_val.txt").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text(text[:40_000], encoding="utf-8")  # ~10k tokens: 78 blocks of 128
    return path


def kd_flags(pruned, text, out, *extra: str) -> list[str]:
    return ["post_training.py", "--prune_model", str(pruned), "--distill_on", str(text), "--output_dir", str(out),
            "--batch_size", "8", "--micro_batch_size", "2", "--max_steps", "4", "--cutoff_len", "128",
            "--val_set_size", "8", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
            "--learning_rate", "5e-3", "--warmup_steps", "0", "--save_total_limit", "10", *extra]


def history(out, step: int = 4) -> list[dict]:
    return json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


def test_lora_kd_end_to_end_writes_an_adapter_and_a_merged_model_equal_to_it(tmp_path, pruned, stories_text):
    from peft import PeftModel

    from LLMPruner.checkpoint import load_model
    out = tmp_path / "run"
    res = run([sys.executable, *kd_flags(pruned, stories_text, out, "--distill_loss", "kl+ce", "--kd_alpha", "0.3",
                                         "--kd_temperature", "2", "--merge", "--eval_ppl", str(stories_text))])
    assert "distillation: kl+ce, T=2, weights (kl, ce)=(0.7, 0.3), teacher on cpu, fused head" in res.stderr
    report = json.loads((out / "recovery_report.json").read_text())
    assert report["global_step"] == 4
    ppl = str(stories_text)
    assert report["ppl_after"][ppl] < report["ppl_before"][ppl]
    steps = [h for h in history(out) if "loss" in h]
    assert len(steps) == 4 and all({"kl", "ce"} <= h.keys() for h in steps)
    base, _ = load_model(str(pruned), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged, _ = load_model(str(out / "merged"), dtype=torch.float32)
    ids = torch.tensor([[1, 403, 407, 261, 378, 100, 13, 281]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)


def test_full_kd_end_to_end_saves_a_pruned_checkpoint_that_evaluate_reads(tmp_path, pruned, stories_text):
    from LLMPruner.checkpoint import load_pruned
    out = tmp_path / "run"
    run([sys.executable, *kd_flags(pruned, stories_text, out, "--distill_loss", "kl", "--train_mode", "full",
                                   "--eval_ppl", str(stories_text))])
    report = json.loads((out / "recovery_report.json").read_text())
    assert not (out / "adapter").exists() and {"model.safetensors", "optimizer.pt"} <= \
        {p.name for p in (out / "checkpoint-4").iterdir()}
    model, _ = load_pruned(out / "merged", torch_dtype=torch.float32)  # strict: checksums and every shape
    before, _ = load_pruned(pruned, torch_dtype=torch.float32)
    assert model.config.layer_shapes == before.config.layer_shapes
    moved = [n for (n, a), b in zip(model.named_parameters(), before.parameters()) if not torch.equal(a, b)]
    assert len(moved) == len(list(model.parameters()))  # every weight trained, not an adapter
    provenance = json.loads((out / "merged" / "pruning.json").read_text())["provenance"]
    assert provenance["base_model"] == str(STORIES) and provenance["train_mode"] == "full"
    res = run([sys.executable, "evaluate.py", "--checkpoints", f"kd={out / 'merged'}", "--ppl", str(stories_text),
               "--tasks", "", "--no_stats", "--device", "cpu", "--output_dir", str(tmp_path / "eval")])
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())["kd"]["ppl"][str(stories_text)]
    assert evaluated == pytest.approx(report["ppl_after"][str(stories_text)], rel=1e-4), res.stderr[-500:]


@pytest.mark.parametrize("flags,message", [
    (["--distill_loss", "kl", "--kd_alpha", "2"], "--kd_alpha 2.0: must be in [0, 1]"),
    (["--distill_loss", "kl", "--kd_temperature", "0"], "--kd_temperature 0.0: must be > 0"),
    (["--distill_loss", "kl", "--kd_chunk_tokens", "0"], "--kd_chunk_tokens 0: must be a positive"),
    (["--teacher", "x"], "--teacher/--teacher_device given but --distill_loss none"),
    (["--distill_loss", "kl", "--distill_on", "/no/such.txt"], "--distill_on '/no/such.txt': no such file"),
    (["--distill_loss", "kl", "--train_mode", "half"], "--train_mode: invalid choice: 'half'"),
])
def test_bad_distillation_flags_are_usage_errors(flags, message, capsys):
    import post_training
    with pytest.raises(SystemExit) as exit_:
        post_training.parse_args(["--prune_model", str(REPO), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_default_teacher_comes_from_pruning_json_or_the_cli_says_to_pass_one(tmp_path, pruned):
    import post_training
    data = tmp_path / "tiny.json"  # a local --data_path: Hub names are refused up front offline
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."}]')
    assert post_training.parse_args(["--prune_model", str(pruned), "--distill_loss", "kl", "--data_path", str(data),
                                     "--output_dir", str(tmp_path / "p")]).teacher == str(STORIES)
    out = subprocess.run([sys.executable, "post_training.py", "--prune_model", str(STORIES), "--output_dir",
                          str(tmp_path / "o"), "--distill_loss", "kl", "--data_path", str(data)],
                         cwd=REPO, env=ENV, capture_output=True,
                         text=True)  # stories260K is no pruned folder: no pruning.json
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "--teacher: not given, and --prune_model" in out.stderr and "pass --teacher MODEL" in out.stderr


def test_two_gloo_processes_take_the_same_steps_as_one(tmp_path, pruned, stories_text):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    flags = ["--distill_loss", "kl+ce", "--train_mode", "full"]
    run([sys.executable, *kd_flags(pruned, stories_text, single, *flags)])
    out = run([*LAUNCHERS["torchrun"], *kd_flags(pruned, stories_text, ddp, *flags)])
    assert "micro-batch 2 x 2 accumulation x 2 process(es)" in out.stderr
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoint-2", "checkpoint-4", "merged",
                                                      "recovery_report.json"]
    # one step sees the same 8 blocks either way (rank r takes micro-batches r, r+2, ...): same losses
    for key in ("loss", "kl", "ce"):
        a = [h[key] for h in history(single) if key in h and "eval_instruct_loss" not in h]
        b = [h[key] for h in history(ddp) if key in h and "eval_instruct_loss" not in h]
        assert len(a) == len(b) == 4 and b == pytest.approx(a, rel=1e-3), (key, a, b)
    evals = lambda h: [e["eval_instruct_loss"] for e in h if "eval_instruct_loss" in e]  # noqa: E731
    assert evals(history(ddp)) == pytest.approx(evals(history(single)), rel=1e-3)
    assert evals(history(ddp))[-1] < evals(history(single))[0]


def test_help_documents_the_distillation_flags(capsys):
    import post_training
    with pytest.raises(SystemExit):
        post_training.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--teacher", "--distill_loss", "--kd_alpha", "--kd_temperature", "--kd_chunk_tokens",
                 "--distill_on", "--teacher_device", "--train_mode"):
        assert flag in text, flag
