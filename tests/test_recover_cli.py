"""CLI runs of post_training.py on stories260K: one process, and two data-parallel CPU processes (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, STORIES, need_shared

FLAGS = ["--prune_model", "--data_path", "--output_dir", "--batch_size", "--micro_batch_size", "--num_epochs",
         "--learning_rate", "--cutoff_len", "--val_set_size", "--prompt_template_name", "--no_instruction",
         "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules", "--train_on_inputs",
         "--add_eos_token", "--group_by_length", "--extra_val_dataset", "--cache_dataset",
         "--resume_from_checkpoint", "--wandb_project", "--dtype", "--seed", "--merge", "--merge_adapter",
         "--deepspeed", "--fsdp"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_help_documents_every_flag():
    text = run([sys.executable, "post_training.py", "--help"]).stdout
    for flag in FLAGS:
        assert flag in text, flag


def test_bad_batch_size_names_the_flags(tmp_path):
    need_shared("models", "stories260K")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Tell a story.", "input": "", "output": "Once upon a time"}] * 4))
    out = subprocess.run([sys.executable, "post_training.py", "--prune_model", str(STORIES), "--data_path",
                          str(data), "--val_set_size", "0", "--batch_size", "6", "--micro_batch_size", "4",
                          "--output_dir", str(tmp_path / "o")], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode != 0 and "--batch_size 6 must be a positive multiple of --micro_batch_size 4" in out.stderr


def small_alpaca(tmp_path, n: int) -> str:
    records = json.loads(need_shared("data", "alpaca", "alpaca_5000.json").read_text())[:n]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return str(path)


def common_flags(data: str, out) -> list[str]:
    return ["post_training.py", "--prune_model", str(STORIES), "--data_path", data, "--output_dir", str(out),
            "--batch_size", "8", "--micro_batch_size", "2", "--num_epochs", "1", "--val_set_size", "8",
            "--eval_steps", "2", "--save_steps", "2", "--cutoff_len", "256", "--learning_rate", "5e-3",
            "--warmup_steps", "0", "--logging_steps", "1", "--prompt_template_name", "alpaca_short",
            "--save_total_limit", "10"]


def state(out, step: int) -> dict:
    return json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())


def test_single_process_run_writes_adapter_and_a_reloadable_merged_model(tmp_path):
    from peft import PeftModel

    from LLMPruner.checkpoint import load_model
    data = small_alpaca(tmp_path, 40)
    out = tmp_path / "run"
    run([sys.executable, *common_flags(data, out), "--merge", "--extra_val_dataset", "wikitext2",
         "--data_dir", str(need_shared("data")), "--extra_val_max_windows", "4"])
    report = json.loads((out / "recovery_report.json").read_text())
    assert report["global_step"] == 4 and report["best_checkpoint"]
    assert {p.name for p in out.iterdir()} >= {"adapter", "merged", "checkpoint-2", "checkpoint-4"}
    assert any("eval_wikitext2_loss" in h for h in state(out, 4)["log_history"])
    base, _ = load_model(str(STORIES), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged, _ = load_model(str(out / "merged"), dtype=torch.float32)
    ids = torch.tensor([[1, 403, 407, 261, 378, 1124 % 512, 13, 281]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, tuned(ids).logits, rtol=1e-5, atol=1e-5)


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's --cpu launcher starts one process; --multi_gpu uses torch.distributed (gloo on CPU)
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_gloo_processes_take_the_same_steps_and_write_one_set_of_checkpoints(tmp_path, launcher):
    data = small_alpaca(tmp_path, 40)  # 32 train + 8 val examples, 8 per optimizer step -> 4 steps
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, *common_flags(data, single)])
    out = run([*LAUNCHERS[launcher], *common_flags(data, ddp)])
    assert "micro-batch 2 x 2 accumulation x 2 process(es)" in out.stderr
    assert state(ddp, 4)["global_step"] == state(single, 4)["global_step"] == 4
    assert sorted(p.name for p in ddp.iterdir()) == ["adapter", "checkpoint-2", "checkpoint-4",
                                                      "recovery_report.json"]
    evals = [h["eval_instruct_loss"] for h in state(ddp, 4)["log_history"] if "eval_instruct_loss" in h]
    assert evals[-1] < evals[0], evals


@pytest.mark.parametrize("script", ["llama_prune.sh", "vicuna_prune.sh", "llama3_prune.sh"])
def test_preset_scripts_parse(script):
    run(["bash", "-n", f"scripts/{script}"])


def test_llama_prune_script_prunes_then_recovers_stories260k(tmp_path):
    if not (REPO / "hf_prune.py").is_file():
        pytest.skip("hf_prune.py (the pruning entry point) is not in this checkout")
    data = small_alpaca(tmp_path, 24)
    name = f"test_recover_{os.getpid()}"
    env = {**ENV, "BASE_MODEL": str(STORIES), "LAYER_START": "1", "LAYER_END": "4", "DEVICE": "cpu",
           "EVAL_DEVICE": "cpu", "DATA_PATH": data, "MAX_STEPS": "2", "BATCH_SIZE": "8", "MICRO_BATCH_SIZE": "4",
           "VAL_SET_SIZE": "8", "PROMPT_TEMPLATE": "alpaca_short", "PRUNE_NAME": name, "TUNE_NAME": name,
           "PRUNE_FLAGS": f"--calibration_data {need_shared('data', 'tinystories', 'tinystories_val.txt')}",
           "TUNE_FLAGS": "--save_steps 2 --eval_steps 2"}
    try:
        out = subprocess.run(["bash", "scripts/llama_prune.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        merged = REPO / "tune_log" / name / "merged"
        assert (merged / "config.json").is_file()
        config = json.loads((merged / "config.json").read_text())
        assert config["layer_shapes"][1]["num_key_value_heads"] == 3  # 0.25 of 4 KV groups pruned
    finally:
        import shutil
        shutil.rmtree(REPO / "prune_log" / name, ignore_errors=True)
        shutil.rmtree(REPO / "tune_log" / name, ignore_errors=True)
