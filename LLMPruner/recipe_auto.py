"""``--recipe auto``: choose among the recipes for *this* model, by measuring.

Each recipe marked ``auto`` prunes a fresh copy of the model to the size asked for (its settings under the
flags given explicitly); each result is scored by its mean next-token loss on held-out windows of the
calibration text, cut from documents that no recipe's calibration draw used. The lowest loss wins; the
table is printed and saved in the run folder (``recipe_auto.json``), and the run then prunes with the winner
as ``--recipe NAME`` would. The best setting measurably differs between models (the issue behind this:
SmolLM2's best recipe lost to the paper's on a held-out TinyStories model), so the choice is validated on the
user's own model and data. It costs one pruning per recipe, plus the final one; one model is in memory at a
time.
"""
from __future__ import annotations

import argparse
import logging
import math
import time

import torch

from LLMPruner.checkpoint import load_model
from LLMPruner.data.calibration import calibration_windows, heldout_windows, load_calibration_text
from LLMPruner.recipe import Recipe, auto_recipes, overlay

logger = logging.getLogger(__name__)

#: held-out windows scored per recipe (of HELDOUT_LEN tokens): 4,096 tokens
HELDOUT_WINDOWS = 32
HELDOUT_LEN = 128


def candidate_args(args: argparse.Namespace, recipe: Recipe) -> argparse.Namespace:
    """``args`` with ``recipe``'s settings, except the flags given explicitly on the command line."""
    trial = argparse.Namespace(**vars(args))
    overlay(trial, recipe.flags(), set(getattr(args, "recipe_explicit", ())))
    trial.recipe = recipe.name
    return trial


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, device: str, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``windows`` ``[n, T]``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def choose_recipe(args: argparse.Namespace, prune_one) -> tuple[argparse.Namespace, list[dict]]:
    """``(the winner's args, the table)``. ``prune_one(model, args)`` prunes ``model`` in place as the run
    would (the same checks, calibration draw and settings) and returns its parameter count."""
    candidates = [(recipe, candidate_args(args, recipe)) for recipe in auto_recipes()]
    _, tokenizer = load_model(args.base_model, device="cpu", dtype="auto", allow_pickle=args.allow_pickle,
                              text_only=args.text_only)
    docs = load_calibration_text(args.calibration_data)
    used: set[int] = set()
    for _, trial in candidates:
        used |= set(calibration_windows(docs, tokenizer, trial.num_examples, trial.calibration_seq_len,
                                        trial.seed)[1])
    try:
        heldout = heldout_windows(docs, tokenizer, sorted(used), HELDOUT_WINDOWS, HELDOUT_LEN)
    except ValueError as err:
        raise ValueError(f"--recipe auto: --calibration_data {args.calibration_data!r}: {err}; auto needs "
                         "documents that no recipe calibrates on (a file of many documents, e.g. C4)") from None
    logger.info("--recipe auto: %d recipes, scored on %d held-out windows of %d tokens (%d of %d documents "
                "used for calibration)", len(candidates), heldout.shape[0], heldout.shape[1], len(used), len(docs))
    rows = []
    for recipe, trial in candidates:
        start = time.perf_counter()
        model, _ = load_model(args.base_model, device=args.device, dtype=trial.dtype, allow_pickle=args.allow_pickle,
                              text_only=args.text_only)
        params = prune_one(model, trial)
        loss = heldout_loss(model.to(args.device), heldout, args.device)
        rows.append({"recipe": recipe.name, "params": params, "heldout_loss": round(loss, 5),
                     "heldout_ppl": round(math.exp(loss), 4), "seconds": round(time.perf_counter() - start, 1)})
        logger.info("--recipe auto: %s", rows[-1])
        del model
    best = min(range(len(rows)), key=lambda i: rows[i]["heldout_loss"])
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    return candidates[best][1], rows


def auto_table(rows: list[dict], windows: str = f"{HELDOUT_WINDOWS} x {HELDOUT_LEN}") -> str:
    lines = [f"--recipe auto: held-out loss of each recipe's model ({windows} tokens of calibration documents "
             "no recipe calibrated on)", "| recipe | parameters | held-out loss | held-out PPL | seconds | |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['params']:,} | {r['heldout_loss']:.4f} | {r['heldout_ppl']:.2f} | "
              f"{r['seconds']} | {'chosen' if r['chosen'] else ''} |" for r in rows]
    return "\n".join(lines)
