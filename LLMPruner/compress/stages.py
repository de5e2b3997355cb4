"""What each stage of a compress run does, and the summary it records in ``<stage>/.done``.

1. ``prune``: ``hf_prune.py`` with the recipe (or configuration) and the size asked for; the pruned model in
   ``prune/``.
2. ``recover``: ``post_training.py`` (default: all weights distilled from the dense model on the calibration
   text); the recovered model in ``recover/merged``, checkpoints along the way for the gain-vs-tokens curve.
3. ``evaluate``: ``evaluate.py`` on dense, pruned and recovered (perplexity, zero-shot tasks, parameters,
   MACs), then the perplexity of each recovery checkpoint (the curve).
4. ``export``: ``export.py`` to GGUF (or the safetensors folder itself); generation tokens/s of the GGUF in
   llama.cpp when ``llama_cpp`` is importable.
5. ``report``: ``report.md``, ``results.json`` and the plots (``report.py``).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from LLMPruner.compress.spec import (CompressSpec, evaluate_argv, export_argv, final_model, prune_argv,
                                     recover_argv, run_script, stage_dir)

logger = logging.getLogger(__name__)


def prune(spec: CompressSpec) -> dict:
    run_script(prune_argv(spec), Path(spec.run_dir) / "logs" / "prune.log")
    results = json.loads((stage_dir(spec, "prune") / "results.json").read_text())
    return {k: results.get(k) for k in ("params_before", "params_after", "ratio", "prune_seconds", "recipe",
                                        "structure", "structure_before")}


def recover(spec: CompressSpec) -> dict:
    if spec.recover == "none":
        return {"recover": "none"}
    run_script(recover_argv(spec), Path(spec.run_dir) / "logs" / "recover.log", spec.launcher)
    report = json.loads((stage_dir(spec, "recover") / "recovery_report.json").read_text())
    tokens = spec.steps * spec.batch_blocks * spec.block_tokens
    runtime = report.get("train_runtime_s") or 0
    return {"recover": spec.recover, "steps": report.get("global_step"), "tokens": tokens,
            "train_loss": report.get("train_loss"), "train_seconds": runtime,
            "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
            "log_history": report.get("log_history", [])}


def _checkpoints(spec: CompressSpec) -> list[tuple[int, str]]:
    """``[(tokens, evaluate.py model spec)]`` of the recovery checkpoints, in training order."""
    out = []
    for path in stage_dir(spec, "recover").glob("checkpoint-*"):
        step = int(path.name.rpartition("-")[2])
        model = str(path) if spec.recover == "kd" else f"{stage_dir(spec, 'prune')}+{path}"
        out.append((step * spec.batch_blocks * spec.block_tokens, model))
    return sorted(out)


def evaluate(spec: CompressSpec) -> dict:
    out = stage_dir(spec, "evaluate")
    models = {"dense": spec.base_model, "pruned": str(stage_dir(spec, "prune"))}
    if spec.recover != "none":
        models["recovered"] = str(final_model(spec))
    log = Path(spec.run_dir) / "logs" / "evaluate.log"
    run_script(evaluate_argv(spec, models, out), log)
    results = json.loads((out / "results.json").read_text())
    curve = [{"tokens": 0, "ppl": results["pruned"].get("ppl", {})}]
    checkpoints = _checkpoints(spec) if spec.recover != "none" else []
    if checkpoints:  # perplexity only: the gain-vs-tokens curve
        names = {f"t{tokens}": model for tokens, model in checkpoints}
        run_script(evaluate_argv(spec, names, out / "curve", tasks=False), log)
        points = json.loads((out / "curve" / "results.json").read_text())
        curve += [{"tokens": tokens, "ppl": points[f"t{tokens}"].get("ppl", {})} for tokens, _ in checkpoints]
    return {"results": results, "curve": curve}


def export(spec: CompressSpec) -> dict:
    out = stage_dir(spec, "export")
    if spec.export == "none":
        return {"export": "none"}
    if spec.export == "safetensors":
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(final_model(spec), out, ignore=shutil.ignore_patterns("checkpoint-*", "optimizer.pt"))
        return {"export": "safetensors", "path": str(out),
                "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}
    run_script(export_argv(spec), Path(spec.run_dir) / "logs" / "export.log")
    gguf = out / "model.gguf"
    return {"export": "gguf", "path": str(gguf), "bytes": gguf.stat().st_size,
            "llamacpp_tokens_per_s": llamacpp_speed(gguf)}


def llamacpp_speed(gguf: Path, tokens: int = 64, threads: int = 1) -> float | None:
    """Generation tokens/s of ``gguf`` in llama.cpp (greedy, from BOS, one thread), or None without
    llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        logger.info("llama-cpp-python is not installed: no llama.cpp tokens/s (pip install llama-cpp-python)")
        return None
    llm = Llama(model_path=str(gguf), n_ctx=tokens + 8, n_threads=threads, verbose=False)
    start = time.perf_counter()
    n = 0
    for _ in llm.generate([llm.token_bos()], top_k=1, temp=0.0, reset=True):
        n += 1
        if n == tokens:
            break
    return round(n / (time.perf_counter() - start), 1)


def report(spec: CompressSpec) -> dict:
    from LLMPruner.compress.report import write_report
    return {"report": str(write_report(spec))}


STAGE_FUNCTIONS = {"prune": prune, "recover": recover, "evaluate": evaluate, "export": export, "report": report}


def stage_seconds(run_dir: Path) -> dict[str, float]:
    return {p.parent.name: json.loads(p.read_text()).get("seconds") for p in Path(run_dir).glob("*/.done")}
