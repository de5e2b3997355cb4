"""The command-line face of distillation: ``post_training.py``'s KD/train-mode argument group, its checks,
and the default teacher (the ``base_model`` recorded in the pruned folder's ``pruning.json``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DISTILL_LOSSES = ("none", "kl", "kl+ce")
TRAIN_MODES = ("lora", "full")


def add_distill_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the ``distillation`` argument group to ``parser``."""
    g = parser.add_argument_group("distillation and training mode", "knowledge distillation from the dense "
                                  "model (docs/recovery.md); off unless --distill_loss kl or kl+ce")
    g.add_argument("--distill_loss", choices=DISTILL_LOSSES, default="none",
                   help="none: the plain language-model loss; kl: KL(teacher || student) only; kl+ce: "
                        "(1 - kd_alpha) * T^2 * KL + kd_alpha * CE")
    g.add_argument("--teacher", default=None,
                   help="teacher model: anything --prune_model accepts (Hub id, folder, .gguf, Meta layout); "
                        "default: the base_model recorded in --prune_model's pruning.json")
    g.add_argument("--kd_alpha", type=float, default=0.5, help="weight of the CE term with --distill_loss kl+ce")
    g.add_argument("--kd_temperature", type=float, default=1.0, help="softmax temperature T of both models")
    g.add_argument("--kd_chunk_tokens", type=int, default=256,
                   help="token positions whose logits exist at once (peak memory ~ 6 x this x vocab floats)")
    g.add_argument("--distill_on", default="instruction",
                   help="training text: 'instruction' (the --data_path examples) or a .txt (blank-line "
                        "separated) / .json / .jsonl (field 'text') file packed into --cutoff_len blocks")
    g.add_argument("--teacher_device", default=None, help="device of the teacher (default: the student's)")
    g.add_argument("--train_mode", choices=TRAIN_MODES, default="lora",
                   help="lora: a peft adapter; full: every weight of the pruned model (written to "
                        "OUTPUT_DIR/merged)")
    return g


def check_distill_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a one-line usage error for inconsistent distillation flags."""
    if not 0.0 <= args.kd_alpha <= 1.0:
        parser.error(f"--kd_alpha {args.kd_alpha}: must be in [0, 1] (the CE term's weight)")
    if not args.kd_temperature > 0:
        parser.error(f"--kd_temperature {args.kd_temperature}: must be > 0")
    if args.kd_chunk_tokens < 1:
        parser.error(f"--kd_chunk_tokens {args.kd_chunk_tokens}: must be a positive number of tokens")
    if args.distill_loss == "none" and (args.teacher or args.teacher_device):
        parser.error("--teacher/--teacher_device given but --distill_loss none: pass --distill_loss kl or kl+ce")
    if args.distill_on != "instruction" and not Path(args.distill_on).is_file():
        parser.error(f"--distill_on {args.distill_on!r}: no such file; pass 'instruction' or a .txt/.json/.jsonl")
    if args.distill_loss != "none" and not args.teacher:
        try:
            args.teacher = default_teacher(args.prune_model)
        except ValueError as err:
            parser.error(str(err))


def default_teacher(prune_model: str) -> str:
    """The ``base_model`` that ``hf_prune.py`` recorded in ``prune_model/pruning.json``."""
    record = Path(prune_model) / "pruning.json"
    base = None
    if record.is_file():
        base = json.loads(record.read_text()).get("provenance", {}).get("base_model")
    if not base:
        raise ValueError(f"--teacher: not given, and --prune_model {prune_model!r} has no pruning.json recording "
                         f"a base_model; pass --teacher MODEL (the dense model it was pruned from)")
    return str(base)
