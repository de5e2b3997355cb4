"""Every script x every model form the README says it takes: each loads the model and runs one step.

Forms: a Hugging Face folder (stories260K), a pruned folder (heterogeneous layers), a GGUF file of that
pruned model (per-layer shapes: LLMPruner's own reader), Meta's layout (stories260K-meta) and a merged
LoRA folder. A ``--dtype`` string reaching a loader as a device (``Invalid device string: 'float32'``) is
what this matrix exists to catch: only the GGUF form showed it.
"""
from __future__ import annotations

import pytest
import torch

from cli_helpers import run_cli
from conftest import SHARED, need_shared

FORMS = ["hub_folder", "pruned", "gguf", "meta", "merged_lora"]


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, str]:
    stories = need_shared("models", "stories260K")
    meta = need_shared("models", "stories260K-meta")
    from peft import LoraConfig, get_peft_model

    from LLMPruner import load_model, prune, save_pruned
    from LLMPruner.adapters import get_adapter
    from LLMPruner.export import export_gguf
    from LLMPruner.recover import save_merged
    root = tmp_path_factory.mktemp("forms")
    model, tokenizer = load_model(stories, dtype=torch.float32)
    prune(model, mode="block_wise", pruning_ratio=0.25, pruner_type="l2", attention_layers=range(1, 4),
          mlp_layers=range(1, 4))
    pruned = save_pruned(model, tokenizer, root / "pruned")
    gguf = export_gguf(model, tokenizer, root / "pruned.gguf", outtype="f32", pad_to=1)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=list(get_adapter(model).lora_target_modules)))
    merged = save_merged(lora, tokenizer, root / "merged")
    return {"hub_folder": str(stories), "pruned": str(pruned), "gguf": str(gguf), "meta": str(meta),
            "merged_lora": str(merged)}


def _argv(script: str, model: str, out) -> list[str]:
    data = SHARED / "data"
    text = str(data / "tinystories" / "tinystories_val.txt")
    return {
        "hf_prune.py": ["--base_model", model, "--pruning_ratio", "0.25", "--pruner_type", "l2", "--block_wise",
                        "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4", "--block_attention_layer_start",
                        "1", "--block_attention_layer_end", "4", "--device", "cpu", "--eval_device", "cpu",
                        "--calibration_data", text, "--num_examples", "2", "--log_dir", str(out),
                        "--save_ckpt_log_name", "run"],
        "post_training.py": ["--prune_model", model, "--data_path", str(data / "alpaca" / "alpaca_5000.json"),
                             "--output_dir", str(out / "tune"), "--max_steps", "1", "--batch_size", "2",
                             "--micro_batch_size", "2", "--val_set_size", "0", "--cutoff_len", "128",
                             "--warmup_steps", "0", "--device", "cpu", "--dtype", "fp32"],
        "evaluate.py": ["--checkpoints", f"m={model}", "--ppl", text, "--max_seq_len", "32", "--tasks", "", "--no_latency",
                        "--device", "cpu", "--output_dir", str(out / "eval")],
        "generate.py": ["--model", model, "--prompt", "Once upon a time,", "--greedy", "--max_new_tokens", "3",
                        "--device", "cpu"],
        "test_speedup.py": ["--model", model, "--seq_len", "8", "--device", "cpu"],
        "export.py": ["--model", model, "--outfile", str(out / "out.gguf"), "--outtype", "f32", "--pad_to", "1"],
    }[script]


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("script", ["hf_prune.py", "post_training.py", "evaluate.py", "generate.py",
                                    "test_speedup.py", "export.py"])
def test_every_script_reads_every_model_form(script, form, forms, tmp_path):
    if script == "evaluate.py":
        need_shared("data", "tinystories")
    status, out, err = run_cli(script, _argv(script, forms[form], tmp_path))
    assert status == 0, f"{script} on {form}: {err[-2000:]}"
    if script == "generate.py":
        assert "Once upon a time," in out
    if script == "export.py":
        assert (tmp_path / "out.gguf").stat().st_size > 0
    if script == "hf_prune.py":
        assert (tmp_path / "run" / "plan.json").is_file()
