"""The vocabulary of every choice a user makes, and the checks that need no model, without torch.

The scripts' argument parsers and the configuration read only this module, so ``--help`` and a usage error
answer in well under a second: torch and transformers are imported after the arguments are known good.
The stage modules import their names from here (one definition each).
"""
from __future__ import annotations

import json
import re

# --- score (estimate.py, activations.py) ---
PRUNER_TYPES = ("random", "l1", "l2", "taylor")
ACTIVATION_PRUNERS = ("fluctuation", "wanda")
ALL_PRUNERS = PRUNER_TYPES + ACTIVATION_PRUNERS
TAYLOR_MODES = ("vectorize", "param_first", "param_second", "param_mix")
GROUPINGS = ("sum", "mean", "max", "prod", "last")
LAYER_IMPORTANCES = ("block_influence", "ppl", "taylor")
EXPERT_IMPORTANCES = ("reap", "frequency", "random")
# --- select (select.py, budget.py, obs.py, obs_allocation.py) ---
ROUNDINGS = ("reference", "nearest")
BUDGET_CRITERIA = ("uniform", "per_param", "zscore")
SELECTIONS = ("score", "obs")
DAMP = 0.01  # lam = DAMP * mean diag(X^T X): SparseGPT's / SlimGPT's default relative dampening
ALLOCATIONS = ("uniform", "residual")
# --- compensate (compensate.py, reconstruct.py) ---
COMPENSATIONS = ("none", "bias", "refit")
#: the one-shot refit from the dense model's statistics: not a user's choice (it lost to the sequential
#: refit everywhere, docs/tried_and_dropped.md), the layer-streamed pass's refit without --offload_sequential
ONESHOT_REFIT = "refit_oneshot"
#: Adam's learning rate of --reconstruct_steps, measured on SmolLM2 (40 WikiText-2 windows: 1e-4 77.33,
#: 3e-4 76.27, 1e-3 76.96; docs/smollm2.md)
RECONSTRUCT_LR = 3e-4
# --- runtime, evaluate, export ---
DTYPES = ("float32", "bfloat16", "float16")
#: perplexity dataset name -> (file inside a local data dir, HF name, HF config, split, field)
PPL_DATASETS = {
    "wikitext2": ("wikitext2/wiki.test.raw", "wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb/ptb.valid.txt", "ptb_text_only", "penn_treebank", "validation", "sentence"),
}
PROTOCOLS = ("reference", "sliding")
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OUTTYPE_NAMES = ("bf16", "f16", "f32", "q8_0")

_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_count(text: str, flag: str = "--target_params") -> int:
    """``"6B"`` -> 6e9, ``"118.6M"`` -> 118,600,000, ``"118589760"`` / ``"6.5e9"`` as written."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]?)\s*", str(text))
    if not m or m.group(2).upper() not in _COUNT_UNITS:
        raise ValueError(f"{flag} {text!r}: expected a parameter count such as 6B, 118.6M or 118589760")
    return int(round(float(m.group(1)) * _COUNT_UNITS[m.group(2).upper()]))


def parse_memory(text: str | int, flag: str = "--max_memory") -> int:
    """``"8GB"`` -> 8e9 bytes, ``"512MiB"`` -> 2**29, ``1000`` -> 1000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _MEMORY_UNITS:
        raise ValueError(f"{flag} {text!r}: expected a size such as 8GB, 512MB or 24GiB")
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).upper()])


def parse_device_map(text: str) -> str | dict:
    """``auto``, a device (``cpu``, ``cuda:1``), or a JSON object ``{"module name": device}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--device_map {text!r}: not valid JSON ({err})") from err
        if not isinstance(value, dict):
            raise ValueError(f"--device_map {text!r}: expected a JSON object of module name -> device")
        return value
    if text in ("auto", "balanced", "sequential") or text == "cpu" or text.startswith(("cuda", "xpu", "mps")):
        return text
    raise ValueError(f"--device_map {text!r}: choose auto, balanced, sequential, a device (cpu, cuda:0) "
                     "or a JSON map such as '{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}'")


def check_selection(selection: str, compensation: str | None) -> None:
    """``--selection obs`` chooses units inside the sequential pass, which only ``--compensation refit`` runs."""
    if selection not in SELECTIONS:
        raise ValueError(f"--selection {selection!r}: choose one of {', '.join(SELECTIONS)}")
    if selection == "obs" and compensation != "refit":
        raise ValueError(f"--selection obs with --compensation {compensation}: OBS selection runs in the "
                         "sequential layer-by-layer pass, which is --compensation refit; add it")


def check_reconstruction(steps: int, lr: float, compensation: str) -> None:
    """Refuse bad ``--reconstruct_steps`` / ``--reconstruct_lr`` values (ValueError naming the flag)."""
    if steps < 0:
        raise ValueError(f"--reconstruct_steps {steps}: must be >= 0 (0 = no reconstruction)")
    if not lr > 0:
        raise ValueError(f"--reconstruct_lr {lr}: must be > 0")
    if steps and compensation != "refit":
        raise ValueError(f"--reconstruct_steps {steps} needs --compensation refit (it runs in the sequential "
                         f"pass), not --compensation {compensation}")
