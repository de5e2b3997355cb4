"""The run of ``hf_prune.py`` once its arguments are parsed and checked (``hf_prune.parse_args``): load the
model, check the flags against it, prune (in memory, ``--offload`` layer by layer, or whole experts), write the
run folder, evaluate.

The run is written to a hidden sibling and moved into place whole, replacing a previous run of that name only
then: with ``--save_model`` as soon as the model is saved (before ``--test_after_train``'s evaluation, which
then cannot lose it), otherwise at the end. A run that fails before that leaves the previous folder as it was
and its own files in ``<log_dir>/<name>.failed``.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from LLMPruner.adapters import get_adapter
from LLMPruner.select.budget import budget_for_target, non_embedding_parameters
from LLMPruner.config import PruneConfig, resolve_layer
from LLMPruner.checkpoint import load_model, save_pruned
from LLMPruner.data.calibration import calibration_examples
from LLMPruner.evaluate.ppl import describe_ppl, evaluate_ppl
from LLMPruner.experts.core import check_expert_count, choose_experts, kept_experts, remove_experts
from LLMPruner.export import check_gguf_exportable, export_gguf
from LLMPruner.plan import PruningPlan
from LLMPruner.prompts import REFERENCE_PROMPTS
from LLMPruner.pipeline import DTYPES, prune_with
from LLMPruner.prune import check_budget, check_layer_range, check_refit_tokens, check_round_to, widest_input
from LLMPruner.prune_args import needs_calibration
from LLMPruner.recipe import AUTO
from LLMPruner.run_folder import RunFolder
from LLMPruner.shrink import count_parameters
from LLMPruner.stream.pipeline import open_source
from LLMPruner.stream.placement import parse_device_map, place_model, unplace_model
from LLMPruner.stream.weights import skeleton
from LLMPruner.structure import ModelStructure

logger = logging.getLogger("hf_prune")


def run(args: argparse.Namespace) -> int:
    """hf_prune.py after its arguments are parsed and checked: load, check against the model, prune, save,
    evaluate."""
    if args.recipe == AUTO:  # prune with each recipe, keep the one with the lowest held-out loss
        args = resolve_auto(args)
    if args.offload and args.prune_experts:
        return main_experts_offload(args)
    if args.offload:
        return main_offload(args)
    # 1. load the model and check the flags against it (nothing is written before they are known good)
    set_seed(args.seed)
    model, tokenizer = load_model(args.base_model, device=args.device, dtype=DTYPES[args.dtype],
                                  allow_pickle=args.allow_pickle, text_only=args.text_only)
    adapter = get_adapter(model)
    if args.prune_experts:  # an expert count the model cannot lose fails before anything is written
        check_expert_count(model, args.prune_experts)
    else:
        adapter.check_width_pruning(model.config)
    if args.save_gguf:
        check_gguf_exportable(model)  # an architecture llama.cpp cannot run fails before any work
    resolve_target(args, model)
    ranges = check_against_model(model.config, args) if not args.prune_experts else {}
    if args.block_wise:  # refuse a refit the calibration tokens cannot support, before writing anything
        check_refit_tokens(args.num_examples, args.calibration_seq_len, widest_input(model), args.compensation)
    if not args.prune_experts and not args.layer_wise:  # and a --round_to wider than a pruned family
        check_round_to(model, args.round_to, "channel_wise" if args.channel_wise else "block_wise",
                       ranges.get("attention_layers"), ranges.get("mlp_layers"), args.param_budget)
        if not args.prune_layers:  # and a budget the prunable units cannot meet (depth pruning comes first)
            check_budget(model, args.param_budget, "channel_wise" if args.channel_wise else "block_wise",
                         ranges.get("attention_layers"), ranges.get("mlp_layers"))
    # the run is written to a temporary sibling and moved into place whole (LLMPruner.run_folder)
    with run_folder(args) as run:
        results = prune_and_save(model, tokenizer, args, ranges, run.path)
        if args.save_model:  # the pruned model is safe before any evaluation (as in the reference)
            run.commit()
        evaluate_after(model, tokenizer, args, run.path, results)
    return 0


def resolve_auto(args: argparse.Namespace) -> argparse.Namespace:
    """``--recipe auto``: the arguments of the recipe whose pruned model has the lowest held-out loss, with
    the table they were chosen from (``args.recipe_auto``), printed here and saved by ``prune_and_save``."""
    from LLMPruner.recipe_auto import auto_table, choose_recipe

    def prune_one(model, trial: argparse.Namespace) -> int:
        get_adapter(model).check_width_pruning(model.config)
        resolve_target(trial, model)
        ranges = check_against_model(model.config, trial)
        check_refit_tokens(trial.num_examples, trial.calibration_seq_len, widest_input(model), trial.compensation)
        examples = calibration_examples(trial.calibration_data, load_tokenizer(trial), trial.num_examples,
                                        trial.calibration_seq_len, trial.seed) if needs_calibration(trial) else None
        set_seed(trial.seed)
        prune_widths(model, trial, ranges, examples)
        return count_parameters(model)

    winner, rows = choose_recipe(args, prune_one)
    print(auto_table(rows), flush=True)
    winner.recipe_auto = rows
    return winner


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer of ``--base_model`` (loaded with a throwaway model only where the folder has no
    tokenizer files of its own: GGUF, Meta layout)."""
    from LLMPruner.checkpoint.load import has_tokenizer
    path = Path(args.base_model)
    if path.is_dir() and has_tokenizer(path):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    return load_model(args.base_model, device="cpu", dtype="auto", allow_pickle=args.allow_pickle,
                      text_only=args.text_only)[1]


@contextmanager
def run_folder(args) -> Iterator[RunFolder]:
    """The run's folder: committed whole when the block ends (or earlier by the caller), abandoned on failure."""
    run, handler = start_log(args)
    try:
        yield run
        if not run.committed:
            run.commit()
    except BaseException:
        run.abandon()  # nothing to do once committed: the folder is then this run's, and says how far it got
        raise
    finally:
        logger.info("run folder %s", run.path)
        logging.getLogger().removeHandler(handler)
        handler.close()


def prune_and_save(model, tokenizer, args, ranges: dict, log_dir: Path) -> dict:
    results: dict = {"base_model": args.base_model}
    # 2. dense perplexity
    if args.test_before_train:
        results["ppl_before"] = run_ppl(model, tokenizer, args, "before")

    # 3. discover -> score -> select -> shrink
    examples = None
    if needs_calibration(args):
        examples = calibration_examples(args.calibration_data, tokenizer, args.num_examples,
                                        args.calibration_seq_len, args.seed)
    if args.device_map:
        place_model(model, parse_device_map(args.device_map), args.max_memory)
    else:
        model.to(args.device)
    before = count_parameters(model)
    dense = get_adapter(model).read_structure(model) if not args.prune_experts else None
    t0 = time.perf_counter()
    plans, structure = prune_experts(model, args, examples) if args.prune_experts \
        else prune_widths(model, args, ranges, examples)
    if args.device_map:
        unplace_model(model, args.device)
    after = count_parameters(model)
    results.update(params_before=before, params_after=after, ratio=after / before,
                   prune_seconds=round(time.perf_counter() - t0, 2), structure=structure.to_dict(),
                   structure_before=dense.to_dict() if dense is not None else None)
    log_target(args)
    logger.info("#Param before: %d, #Param after: %d, Ratio = %.4f%%", before, after, 100 * after / before)
    logger.info("structure:\n%s", structure.describe())
    (log_dir / "plan.json").write_text(json.dumps([p.to_dict() for p in plans]))
    if getattr(args, "recipe_auto", None):
        (log_dir / "recipe_auto.json").write_text(json.dumps(args.recipe_auto, indent=2))
    results["recipe"] = args.recipe

    # 4. the pruned checkpoint, before any evaluation that could fail
    results["saved_model"] = bool(args.save_model)
    if args.save_model:
        save_pruned(model.to("cpu"), tokenizer, log_dir,
                    provenance={"base_model": args.base_model, "args": vars(args),
                                "params_before": before, "params_after": after},
                    round_to=args.round_to if args.round_to > 1 else None)
    if args.save_gguf:
        export_gguf(model.to("cpu"), tokenizer, log_dir / "model.gguf", outtype=args.gguf_outtype)
    model.to(args.device)
    write_results(log_dir, results)
    return results


def prune_experts(model, args, examples) -> tuple[list[PruningPlan], ModelStructure]:
    """--prune_experts: the same number of whole experts leaves every MoE layer (LLMPruner/experts/core.py)."""
    plan = choose_experts(model, args.prune_experts, examples, args.expert_importance,
                          batch_size=args.calibration_batch_size, seed=args.seed)
    remove_experts(model, kept_experts(plan, model))
    return [plan], get_adapter(model).read_structure(model)


def prune_widths(model, args, ranges: dict, examples) -> tuple[list[PruningPlan], ModelStructure]:
    """Heads, channels, the hidden size or layers (LLMPruner/prune.py)."""
    _log_linalg(args)
    result = prune_with(model, stage_config(args), examples, ranges=ranges)
    return result.plans, result.structure


def evaluate_after(model, tokenizer, args, log_dir: Path, results: dict) -> None:
    """5. sample generations and perplexity of the pruned model; results.json says how far it got."""
    if not args.test_after_train:
        return
    try:
        model.to(args.eval_device)
        results["generations"] = sample_generations(model, tokenizer, args)
        results["ppl_after"] = run_ppl(model, tokenizer, args, "after")
        results["ppl_text"] = {name: describe_ppl(name, args.max_seq_len) for name in results["ppl_after"]}
    except BaseException as err:
        results["evaluation_error"] = f"{type(err).__name__}: {err}"
        write_results(log_dir, results)
        if args.save_model:
            logger.error("evaluation after pruning failed; the pruned model is saved in %s", log_dir)
        raise
    write_results(log_dir, results)


def write_results(log_dir: Path, results: dict) -> None:
    (log_dir / "results.json").write_text(json.dumps(results, indent=2))


def resolve_target(args, model) -> None:
    """``--target_params`` becomes the ``--param_budget`` that reaches it, from the model's own counts (a
    meta-device skeleton's under ``--offload``: nothing is loaded to count)."""
    if args.target_params is None:
        return
    if args.layer_wise:
        raise ValueError(f"--target_params {args.target_params:,}: --layer_wise keeps the first --layer layers "
                         "whatever their size; use --block_wise or --channel_wise (or --prune_layers for depth)")
    total, non_embedding = count_parameters(model), non_embedding_parameters(model)
    args.param_budget = budget_for_target(total, non_embedding, args.target_params)
    args.target_note = (f"--target_params {args.target_params:,}: {total - args.target_params:,} of {total:,} "
                        f"parameters to remove, --param_budget {args.param_budget:.6f} of the {non_embedding:,} "
                        "outside the embeddings and head")


def log_target(args) -> None:
    """Say in prune.log what --target_params became (the log file opens after it is resolved)."""
    if getattr(args, "target_note", None):
        logger.info("%s", args.target_note)


def check_against_model(config, args) -> dict[str, range]:
    """Flags that only the loaded model's config can check; returns the layer ranges for ``prune``."""
    n_layers = config.num_hidden_layers
    ranges = {}
    explicit = any(v is not None for v in (args.block_attention_layer_end, args.block_mlp_layer_end))

    def layers(kind: str) -> range:  # an end below 0 counts from the last layer, a start in (0, 1) is a fraction
        start = resolve_layer(getattr(args, f"block_{kind}_layer_start"), n_layers, 0)
        end = resolve_layer(getattr(args, f"block_{kind}_layer_end"), n_layers, n_layers - 1)
        return check_layer_range(f"--block_{kind}_layer", start, end, n_layers)

    if args.block_wise and (args.param_budget is None or explicit):
        ranges = {"attention_layers": layers("attention"), "mlp_layers": layers("mlp")}
    if args.skip_attention:
        ranges["attention_layers"] = range(0)
        ranges.setdefault("mlp_layers", layers("mlp"))
    if args.layer_wise and not 1 <= args.layer <= n_layers:
        raise ValueError(f"--layer {args.layer}: must be between 1 and {n_layers} (layers to keep)")
    if args.layer_wise and args.compensation != "none":
        raise ValueError(f"--compensation {args.compensation} does not apply to --layer_wise, which keeps the "
                         "first --layer decoder layers and changes no weights; drop it, or remove layers by "
                         "importance with --prune_layers N (which --compensation can follow)")
    positions = getattr(config, "max_position_embeddings", None)
    used = [("--calibration_seq_len", args.calibration_seq_len, not args.layer_wise),
            ("--max_seq_len", args.max_seq_len, args.test_before_train or args.test_after_train)]
    for flag, value, in_use in used:
        if positions and in_use and value > positions:
            raise ValueError(f"{flag} {value}: longer than the model's max_position_embeddings {positions} "
                             f"({args.base_model}); use at most {positions}")
    return ranges


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_config(args) -> PruneConfig:
    """The configuration the stages run: the budget a --target_params became for this model, not the target."""
    return PruneConfig.from_flat({**vars(args), "target_params": None})


def run_config(args) -> PruneConfig:
    """The configuration this run prunes with (a --target_params run keeps the target, not the budget it
    became for this model)."""
    flat = dict(vars(args))
    if flat.get("target_params") is not None:
        flat["param_budget"] = None
    return PruneConfig.from_flat(flat)


def start_log(args) -> tuple[RunFolder, logging.Handler]:
    run = RunFolder(Path(args.log_dir) / args.save_ckpt_log_name)
    log_dir = run.path
    (log_dir / "command.txt").write_text(" ".join([sys.executable] + sys.argv) + "\n")
    (log_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    run_config(args).save(log_dir / "prune_config.json")  # what --config replays
    handler = logging.FileHandler(log_dir / "prune.log", mode="w")  # follows the folder when it moves
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logger.info("run folder %s (written to %s until it succeeds); args %s", run.final, log_dir,
                json.dumps(vars(args)))
    return run, handler


def run_ppl(model, tokenizer, args, when: str) -> dict[str, float]:
    model.to(args.eval_device)
    names = [n for n in args.ppl_datasets.split(",") if n]
    ppl = evaluate_ppl(model, tokenizer, names, seq_len=args.max_seq_len, batch_size=args.eval_batch_size,
                       data_dir=args.eval_data_dir, device=args.eval_device)
    logger.info("PPL %s pruning: %s", when, {k: round(v, 4) for k, v in ppl.items()})
    print(f"PPL {when} pruning: {json.dumps({k: round(v, 4) for k, v in ppl.items()})}", flush=True)
    for name in ppl:  # which text and windows each figure is (not the benchmarks' 160-window protocol)
        print(f"  {name}: {describe_ppl(name, args.max_seq_len)}", flush=True)
    model.to(args.device)
    return ppl


@torch.no_grad()
def sample_generations(model, tokenizer, args) -> list[dict[str, str]]:
    model.eval()
    out = []
    for prompt in REFERENCE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.eval_device)
        gen = model.generate(ids, do_sample=True, top_k=50, max_length=max(args.max_seq_len, ids.shape[1] + 1),
                             top_p=args.top_p, temperature=args.temperature,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(gen[0], skip_special_tokens=True)
        logger.info("%s\n%s", text, "=" * 40)
        out.append({"prompt": prompt, "output": text})
    return out


# --- larger than the machine: --offload (layer by layer) and --device_map (accelerate placement) -------------
def main_offload(args: argparse.Namespace) -> int:
    """--offload: the run of ``main`` with the model never loaded whole; the checkpoint is always written."""
    set_seed(args.seed)
    model_or_folder, tokenizer, config = open_source(args.base_model, dtype=DTYPES[args.dtype],
                                                     allow_pickle=args.allow_pickle, text_only=args.text_only)
    resolve_target(args, model_or_folder if isinstance(model_or_folder, torch.nn.Module) else skeleton(config))
    ranges = check_against_model(config, args)
    with run_folder(args) as run:
        results = offload_prune_and_save(model_or_folder, tokenizer, args, ranges, run.path)
        run.commit()  # the checkpoint is always written under --offload: safe before any evaluation
        if args.test_after_train:  # the pruned model, loaded from the folder just written
            from LLMPruner.checkpoint import load_pruned
            model, tokenizer = load_pruned(run.path, torch_dtype=DTYPES[args.dtype])
            evaluate_after(model, tokenizer, args, run.path, results)
    return 0


def main_experts_offload(args: argparse.Namespace) -> int:
    """--prune_experts with --offload: scores from the model placed by accelerate (device, host, disk), then
    the checkpoint rewritten tensor by tensor (LLMPruner/experts/offload.py); neither model is ever whole in
    host memory (the scoring reads a copy in fused names, written one layer at a time)."""
    import tempfile
    from transformers import AutoTokenizer
    from LLMPruner.checkpoint.load import has_tokenizer
    from transformers import AutoConfig
    from LLMPruner.checkpoint.save import write_record
    from LLMPruner.experts.offload import fused_copy, local_folder, open_offloaded, placement, rewrite_checkpoint
    from LLMPruner.stream.memory import parse_memory
    set_seed(args.seed)
    folder = local_folder(args.base_model)
    # a model type or expert count that cannot be pruned fails from a meta-device skeleton, before any copy
    config = AutoConfig.from_pretrained(folder)
    get_adapter(config)
    n_experts = check_expert_count(skeleton(config), args.prune_experts)[0].num_experts
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    examples = calibration_examples(args.calibration_data, tokenizer, args.num_examples, args.calibration_seq_len,
                                    args.seed) if needs_calibration(args) else None
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".offload-", dir=args.log_dir) as offload_dir:
        fused = fused_copy(folder, Path(offload_dir) / "fused", DTYPES[args.dtype])  # one layer at a time
        model = open_offloaded(fused, args.device, parse_memory(args.max_memory) if args.max_memory else None,
                               DTYPES[args.dtype], Path(offload_dir) / "accelerate")
        with run_folder(args) as run:
            placed = placement(model)
            logger.info("--offload: %s placed on %s (accelerate; what is on disk streams in from %s)", folder,
                        placed, offload_dir)
            t0 = time.perf_counter()
            plan = choose_experts(model, args.prune_experts, examples, args.expert_importance,
                                  batch_size=args.calibration_batch_size, seed=args.seed)
            keep = kept_experts(plan, model)
            del model
            counts = rewrite_checkpoint(folder, run.path, keep, n_experts, DTYPES[args.dtype])
            write_record(run.path, parameters=counts["params_after"], loader="transformers",
                         provenance={"base_model": args.base_model, "args": vars(args), **counts})
            if tokenizer is not None and not has_tokenizer(run.path):
                tokenizer.save_pretrained(run.path)
            results = {"base_model": args.base_model, "params_before": counts["params_before"],
                       "params_after": counts["params_after"],
                       "ratio": counts["params_after"] / counts["params_before"],
                       "prune_seconds": round(time.perf_counter() - t0, 2), "saved_model": True,
                       "experts_per_layer": len(next(iter(keep.values()))), "placement": placed}
            logger.info("#Param before: %d, #Param after: %d, Ratio = %.4f%% (stored tensor elements)",
                        counts["params_before"], counts["params_after"], 100 * results["ratio"])
            (run.path / "plan.json").write_text(json.dumps([plan.to_dict()]))
            write_results(run.path, results)
            run.commit()  # the checkpoint is always written under --offload: safe before any evaluation
            if args.test_after_train:
                from LLMPruner.checkpoint import load_pruned
                model, tokenizer = load_pruned(run.path, torch_dtype=DTYPES[args.dtype])
                evaluate_after(model, tokenizer, args, run.path, results)
    return 0


def _log_linalg(args) -> None:
    """Say where the refit's float64 linear algebra runs when the model is on a GPU and it is not."""
    if args.compensation == "refit" and torch.device(args.device).type == "cuda" \
            and torch.device(args.linalg_device).type == "cpu":
        logger.info("--compensation refit: its float64 statistics, OBS selection and solves run on the host "
                    "(--linalg_device cpu); --linalg_device auto runs them on %s, much faster on 7B-70B MLPs",
                    args.device)


def offload_prune_and_save(model_or_folder, tokenizer, args, ranges: dict, log_dir: Path) -> dict:
    examples = None
    if args.pruner_type in ("taylor", "fluctuation", "wanda") or args.compensation != "none":
        examples = calibration_examples(args.calibration_data, tokenizer, args.num_examples,
                                        args.calibration_seq_len, args.seed)
    _log_linalg(args)
    result = prune_with(model_or_folder, stage_config(args), examples, ranges=ranges, save_to=log_dir,
                        tokenizer=tokenizer, provenance={"base_model": args.base_model, "args": vars(args)})
    results = {"base_model": args.base_model, "params_before": result.params_before,
               "params_after": result.params_after, "ratio": result.params_after / result.params_before,
               "structure": result.structure.to_dict(), "stages": result.peaks, "saved_model": True}
    log_target(args)
    logger.info("#Param before: %d, #Param after: %d, Ratio = %.4f%%", result.params_before,
                result.params_after, 100 * result.params_after / result.params_before)
    (log_dir / "plan.json").write_text(json.dumps([result.plan.to_dict()]))
    write_results(log_dir, results)
    return results
