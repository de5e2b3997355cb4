"""One command from a dense model to a smaller, recovered, evaluated, deployable one.

    python compress.py --base_model ../shared/models/SmolLM2-135M-Instruct-Q4_1 --target_params 107613504 \
        --calibration_data ../shared/data/c4/c4_demo.jsonl --data_dir ../shared/data \
        --tasks piqa,arc_easy --zeroshot_dir ../shared/data/zeroshot --run_dir runs/smollm2-20

Stages, each a subfolder of --run_dir with a ``.done`` marker: prune (``--recipe``, default quality) ->
recover (default: every weight distilled from the dense model on the calibration text) -> evaluate (dense,
pruned, recovered; perplexity, zero-shot tasks, parameters, MACs; the gain-vs-tokens curve) -> export (GGUF
for llama.cpp) -> report (``report.md`` with plots, ``results.json``). Rerunning the same command resumes
after the last finished stage (an interrupted recovery from its last checkpoint). Every flag is checked
before the first stage starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, fields
from pathlib import Path

from LLMPruner import cli
from LLMPruner.options import PPL_DATASETS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    a = p.add_argument
    a("--base_model", required=True, help="the dense model: Hub id, folder, .gguf or Meta layout")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--target_params", default=None, help="parameters to keep in all (e.g. 6B, 107.6M)")
    size.add_argument("--param_budget", type=float, default=None, help="fraction of non-embedding parameters to remove")
    size.add_argument("--pruning_ratio", type=float, default=None, help="fraction of each pruned layer's units")
    a("--recipe", default="quality", help="hf_prune.py --recipe (--list_recipes there; auto chooses by measuring)")
    a("--config", default=None, help="a prune_config.json / YAML instead of --recipe")
    a("--calibration_data", default="c4", help="pruning calibration text: a dataset name or a local file")
    a("--recover", default="kd", choices=("kd", "lora", "none"),
      help="kd: every weight distilled from the dense model (measured best on SmolLM2 PTB); lora: LoRA on the "
           "text's own loss; none: pruning only")
    a("--distill_on", default=None, help="recovery text (.txt/.json/.jsonl); default: --calibration_data's file")
    a("--recover_tokens", type=int, default=163_840, help="recovery tokens (blocks of --block_tokens)")
    a("--block_tokens", type=int, default=128, help="tokens per training block")
    a("--curve_points", type=int, default=3, help="recovery checkpoints evaluated for the gain-vs-tokens curve")
    a("--learning_rate", type=float, default=None, help="default: 2e-4 for kd, 2e-3 for lora (docs/recovery.md)")
    a("--kd_temperature", type=float, default=1.0, help="distillation temperature")
    a("--export", default="gguf", choices=("gguf", "safetensors", "none"), help="the deliverable's format")
    a("--ppl", nargs="*", default=["wikitext2", "ptb"], help="perplexity texts (names or files)")
    a("--data_dir", default=None, help="local folder with wikitext2/ and ptb/ (offline)")
    a("--ppl_windows", type=int, default=None, help="the first N windows of each text (default: all)")
    a("--tasks", default="", help="lm-eval zero-shot tasks, e.g. piqa,arc_easy (empty: none)")
    a("--zeroshot_dir", default=None, help="local task files (offline)")
    a("--limit", type=int, default=None, help="first N examples of each task")
    a("--run_dir", default="compress_run", help="the run folder (a rerun of the same command resumes it)")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--launcher", default="", help="how to start the recovery, e.g. 'torchrun --nproc_per_node 4'")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    check_inputs(args)
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Everything checkable before the first stage: sizes, files, folders, tasks; the model's size last."""
    if args.target_params is None and args.param_budget is None and args.pruning_ratio is None:
        raise cli.UsageError("--target_params, --param_budget or --pruning_ratio: give the size to prune to")
    for flag in ("recover_tokens", "block_tokens", "curve_points", "limit", "ppl_windows"):
        cli.check_min(f"--{flag}", getattr(args, flag), 1)
    cli.check_source("--base_model", args.base_model, "model", "--base_model ../shared/models/stories260K")
    cli.check_source("--calibration_data", args.calibration_data, "dataset",
                     "--calibration_data ../shared/data/c4/c4_demo.jsonl")
    if args.recover != "none":
        text = args.distill_on or args.calibration_data
        if not Path(text).is_file():
            flag = "--distill_on" if args.distill_on else "--calibration_data (the default --distill_on)"
            raise cli.UsageError(f"{flag} {text!r}: the recovery needs a local .txt/.json/.jsonl file; pass "
                                 "--distill_on FILE (e.g. ../shared/data/c4/c4_demo.jsonl), or --recover none")
    for name in args.ppl:
        if name not in PPL_DATASETS and not Path(name).is_file():
            raise cli.UsageError(f"--ppl {name!r}: neither {sorted(PPL_DATASETS)} nor a text file")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise cli.UsageError(f"--data_dir {args.data_dir!r}: no such folder")
    if args.tasks and args.zeroshot_dir is None and not cli.hub_reachable():
        raise cli.UsageError(f"--tasks {args.tasks}: lm-eval downloads these from the Hub, which is unreachable; "
                             "pass --zeroshot_dir ../shared/data/zeroshot or --tasks ''")
    cli.check_writable_dir("--run_dir", args.run_dir)
    args.device = cli.check_device("--device", args.device or cli.default_device())


def build_spec(args: argparse.Namespace, argv: list[str]):
    from LLMPruner.compress.report import command_line
    from LLMPruner.compress.spec import CompressSpec
    size = [f for flag in ("target_params", "param_budget", "pruning_ratio") if getattr(args, flag) is not None
            for f in (f"--{flag}", str(getattr(args, flag)))]
    known = {f.name for f in fields(CompressSpec)}
    values = {k: v for k, v in vars(args).items() if k in known}
    return CompressSpec(**values, size_flags=size, command=command_line(argv))


def check_against_the_run(spec, args: argparse.Namespace) -> None:
    """The same --run_dir resumes the same command only; the size must be below the model's."""
    from LLMPruner.compress.spec import CompressSpec
    saved = Path(spec.run_dir) / "spec.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        differ = [k for k, v in asdict(spec).items() if k != "command" and old.get(k) != v]
        if differ:
            raise cli.UsageError(f"--run_dir {spec.run_dir!r}: holds a run of another command (it differs in "
                                 f"{', '.join(differ)}); choose another --run_dir to keep both")
    if args.target_params is not None:
        from LLMPruner.options import parse_count
        from LLMPruner.stream.pipeline import open_source
        from LLMPruner.stream.weights import skeleton
        target = parse_count(args.target_params)
        _, _, config = open_source(args.base_model)  # the config alone (a meta skeleton counts)
        total = sum(p.numel() for p in skeleton(config).parameters())
        if target >= total:
            raise cli.UsageError(f"--target_params {args.target_params}: the model has {total:,} parameters; "
                                 "ask for fewer")
    assert isinstance(spec, CompressSpec)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # every flag checked before torch and transformers are imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from LLMPruner.compress.spec import StageError, run_stages
    from LLMPruner.compress.stages import STAGE_FUNCTIONS
    spec = build_spec(args, argv)
    check_against_the_run(spec, args)
    try:
        ran = run_stages(spec, STAGE_FUNCTIONS)
    except StageError as err:
        raise RuntimeError(f"a stage failed: {err} (rerun the same command to resume after the finished "
                           "stages)") from None
    print(f"stages run: {', '.join(ran) or 'none (all done before)'}; report: {Path(spec.run_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    cli.run(main, "compress.py")
