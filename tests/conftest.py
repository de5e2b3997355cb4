"""Shared fixtures: the ../shared folder, tiny models built in code, one CPU thread."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNER_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"


def need_shared(*parts: str) -> Path:
    """Path under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared material), which is absent")
    return path


def tiny_config(model_type: str = "llama", **overrides):
    """A tiny config of a LLaMA-family architecture (GQA by default)."""
    from transformers import AutoConfig
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    return perturbed_model(tiny_config(model_type, **overrides), seed)


def perturbed_model(config, seed: int = 0):
    """An eager-attention model of ``config`` with every parameter perturbed (seeded)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    # random init leaves norms at 1 and biases at 0: perturb so equivalence tests mean something
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class Interrupt(Exception):
    """Raised by ``kill_at_step``: a training run killed mid-way (resume tests)."""


def kill_at_step(step: int):
    """A Trainer callback that raises ``Interrupt`` at the end of optimizer step ``step``."""
    from transformers import TrainerCallback

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt

    return KillAtStep()


@pytest.fixture
def stories_path() -> Path:
    return need_shared("models", "stories260K")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs a real model from ../shared (seconds to minutes)")
