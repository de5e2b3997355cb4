"""LoRA recovery with Trainer on a tiny model: loss goes down, NaN stops the run, resume is exact."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import Interrupt, kill_at_step, tiny_model
from test_recover_data import alpaca_records, char_tokenizer, write

from LLMPruner.adapters import get_adapter
from LLMPruner.recover import (RecoveryConfig, TrainingDivergedError, build_instruction_datasets,
                               build_trainer, gradient_accumulation_steps)


def setup(tmp_path, n: int = 24, val: int = 4, **overrides):
    tok = char_tokenizer()
    train, val_set = build_instruction_datasets(write(tmp_path, "data.json", alpaca_records(n)), tok,
                                                cutoff_len=128, val_set_size=val,
                                                prompt_template_name="alpaca_short")
    config = RecoveryConfig(output_dir=str(tmp_path / "out"), batch_size=4, micro_batch_size=2, max_steps=6,
                            learning_rate=1e-2, warmup_steps=0, lora_target_modules=["q_proj", "v_proj", "down_proj"],
                            eval_steps=2, save_steps=2, save_total_limit=10, logging_steps=1, disable_tqdm=True,
                            use_cpu=True)
    for key, value in overrides.items():
        setattr(config, key, value)
    return tok, train, ({"instruct": val_set} if val_set is not None else {}), config


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}


def test_gradient_accumulation_from_batch_micro_batch_and_processes():
    assert gradient_accumulation_steps(128, 4, 1) == 32
    assert gradient_accumulation_steps(128, 4, 2) == 16
    with pytest.raises(ValueError, match="--batch_size 100 must be a positive multiple of --micro_batch_size 8"):
        gradient_accumulation_steps(100, 8, 1)


def test_a_few_lora_steps_lower_the_training_loss(tmp_path):
    from transformers import set_seed
    set_seed(0)
    tok, train, evals, config = setup(tmp_path, max_steps=12, lora_dropout=0.0, learning_rate=5e-2)
    trainer = build_trainer(tiny_model(vocab_size=128, max_position_embeddings=128), tok, train, evals, config)
    before = trainer.evaluate(eval_dataset=train)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_dataset=train)["eval_loss"]
    assert after < before - 0.2, (before, after)  # seeded: 4.78 -> 4.48
    assert trainer.state.global_step == 12
    # only LoRA weights trained; base weights untouched
    assert all(("lora_" in n) == p.requires_grad for n, p in trainer.model.named_parameters())


def test_checkpoints_are_peft_adapters_with_resume_state_and_best_is_tracked(tmp_path):
    tok, train, evals, config = setup(tmp_path, max_steps=4)
    trainer = build_trainer(tiny_model(vocab_size=128, max_position_embeddings=128), tok, train, evals, config)
    trainer.train()
    for step in (2, 4):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                "rng_state.pth", "trainer_state.json"} <= files, files
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == config.lora_r
    state = trainer.state
    assert state.best_model_checkpoint is not None and state.best_metric is not None
    evals_logged = [h["eval_instruct_loss"] for h in state.log_history if "eval_instruct_loss" in h]
    assert len(evals_logged) == 2 and state.best_metric == min(evals_logged)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    tok, train, evals, config = setup(tmp_path)
    model = tiny_model(vocab_size=128, max_position_embeddings=128)
    with torch.no_grad():
        get_adapter(model).decoder_layers(model)[1].post_attention_layernorm.weight.fill_(float("nan"))
    trainer = build_trainer(model, tok, train, evals, config)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at optimizer step 1 .*--dtype bf16 or --dtype fp32"):
        trainer.train()


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    from transformers import set_seed

    def run(folder, callbacks=None, resume=None):
        set_seed(1)
        (tmp_path / folder).mkdir(exist_ok=True)
        tok, train, evals, config = setup(tmp_path / folder, lora_dropout=0.1)
        trainer = build_trainer(tiny_model(vocab_size=128, max_position_embeddings=128), tok, train, evals, config, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    with pytest.raises(Interrupt):
        run("killed", callbacks=[kill_at_step(3)])
    checkpoint = tmp_path / "killed" / "out" / "checkpoint-2"
    assert checkpoint.is_dir() and not (tmp_path / "killed" / "out" / "checkpoint-4").exists()
    resumed = run("killed", resume=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 6
    a, b = lora_state(full), lora_state(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h.get("step", 0) > 2]
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)
