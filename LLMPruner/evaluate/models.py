"""Checkpoint specs for evaluation: ``NAME=MODEL[+LORA_DIR]`` -> a model ready to evaluate.

``MODEL`` is a Hugging Face id or folder (base or pruned, loaded by ``LLMPruner.checkpoint.load_model``);
``LORA_DIR`` is a peft adapter folder (e.g. ``tune/checkpoint-200``), merged into the weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    model: str
    lora: str | None = None


def parse_spec(text: str) -> CheckpointSpec:
    """``"pruned+lora=out/pruned+out/tune/checkpoint-200"`` -> CheckpointSpec (the name is optional)."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    model, _, lora = rest.partition("+")
    if not model:
        raise ValueError(f"--checkpoints {text!r}: expected NAME=MODEL or NAME=MODEL+LORA_DIR")
    if lora and not Path(lora).is_dir():
        raise FileNotFoundError(f"--checkpoints {text!r}: LoRA folder {lora!r} does not exist")
    return CheckpointSpec(name=name or Path(rest).name or rest, model=model, lora=lora or None)


def load_for_eval(spec: CheckpointSpec, device: str = "cpu", dtype: "torch.dtype | str" = "auto", *,
                  allow_pickle: bool = False):
    """``(model, tokenizer)`` of a spec, with its LoRA adapter merged when given (``allow_pickle``: see
    ``load_model``)."""
    from LLMPruner.checkpoint import load_model
    # text tasks read only the language model of an image-text checkpoint (the same logits on text)
    model, tokenizer = load_model(spec.model, device=device, dtype=dtype, allow_pickle=allow_pickle, text_only=True)
    if spec.lora:
        model = load_adapter(model, Path(spec.lora)).merge_and_unload()
        logger.info("%s: merged LoRA adapter %s", spec.name, spec.lora)
    return model.eval(), tokenizer


#: where an adapter's weights may be: peft's names, and the reference's Trainer checkpoints
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def load_adapter(model, folder: Path):
    """A ``PeftModel`` of ``model`` with the adapter in ``folder``: a peft folder, or the reference's
    ``TUNE_DIR/checkpoint-N`` (LoRA weights in ``pytorch_model.bin``, ``adapter_config.json`` one level
    up), read in place with ``torch.load(weights_only=True)`` (tensors only: no code runs)."""
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    if (folder / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(model, str(folder))
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None or not (folder.parent / "adapter_config.json").is_file():
        raise FileNotFoundError(f"LoRA folder {str(folder)!r}: no adapter_config.json, nor the reference's layout "
                                f"({folder.parent}/adapter_config.json and {folder}/pytorch_model.bin)")
    config = PeftConfig.from_pretrained(str(folder.parent))
    config.inference_mode = True
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(weights)
    else:
        import torch
        state = torch.load(weights, map_location="cpu", weights_only=True)
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, state)
    lora_keys = [k for k in state if "lora_" in k]
    if not lora_keys or getattr(result, "unexpected_keys", None):
        raise ValueError(f"{weights}: not the LoRA weights of this model (LoRA tensors: {len(lora_keys)}, "
                         f"unexpected: {list(getattr(result, 'unexpected_keys', []))[:3]})")
    logger.info("adapter %s read in the reference's layout (config from %s)", weights, folder.parent)
    return peft_model
