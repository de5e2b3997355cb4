"""Zero-shot accuracy with the real lm-evaluation-harness (``pip install lm-eval``), on a model in memory.

The paper's seven tasks are lm-eval's own task definitions (prompts, choices, metrics). With network
they load as lm-eval normally does. Offline, ``data_dir`` points at local copies in each dataset's
Hugging Face schema, one file per task, named after the split lm-eval scores::

    data_dir/
      boolq/validation.jsonl        piqa/validation.jsonl       hellaswag/validation.jsonl
      winogrande/validation.jsonl   arc_easy/test.jsonl         arc_challenge/test.jsonl
      openbookqa/test.jsonl

Only the dataset source changes; everything else is lm-eval's task config. Both ``acc`` and
``acc_norm`` are returned wherever lm-eval computes them.
"""
from __future__ import annotations

import difflib
import logging
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

from LLMPruner.options import PAPER_TASKS  # noqa: E402,F401  (re-exported)
METRICS = ("acc", "acc_norm")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError("zero-shot evaluation needs lm-evaluation-harness: pip install 'lm-eval>=0.4.9'"
                          ) from err


@lru_cache(maxsize=1)
def task_manager():
    """lm-eval's TaskManager (indexes every task YAML once: ~10 s, so it is cached)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager
    return TaskManager()


def check_tasks(tasks: list[str]) -> None:
    """Raise ``ValueError`` "Unknown task 'x'. Did you mean ...?" for names lm-eval does not know."""
    if not tasks:
        raise ValueError(f"--tasks is empty: give task names, e.g. {','.join(PAPER_TASKS)}")
    known = task_manager().all_subtasks
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, list(PAPER_TASKS) + list(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--tasks: unknown task {name!r}.{hint} The paper's tasks: {', '.join(PAPER_TASKS)}")


def local_task_config(name: str, data_dir: str | Path) -> dict:
    """lm-eval's config of task ``name`` with its dataset read from ``data_dir/name/<split>.jsonl``."""
    manager = task_manager()
    cfg = manager._factory._load_full_config(manager._entry(name), None)  # lm-eval's YAML, functions resolved
    split = cfg.get("test_split") or cfg.get("validation_split")
    assert split, f"task {name} has neither a test nor a validation split: {cfg}"
    path = Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"--zeroshot_dir {str(data_dir)!r}: task {name!r} needs {path} (the {split} split in the "
            f"dataset's Hugging Face schema, one JSON object per line); see docs/evaluation.md")
    split_key = "test_split" if cfg.get("test_split") else "validation_split"
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(path)}},
               training_split=None, fewshot_split=None, validation_split=None, test_split=None)
    cfg[split_key] = split
    cfg.pop("metadata", None)
    return cfg


def evaluate_zeroshot(model, tokenizer, tasks: list[str], data_dir: str | Path | None = None,
                      limit: int | None = None, batch_size: int = 8, device: str | None = None,
                      max_length: int | None = None, seed: int = 1234) -> dict[str, dict[str, float]]:
    """``{task: {"acc": .., "acc_norm": ..}}`` of ``model`` on lm-eval ``tasks`` (zero-shot).

    ``data_dir``: run offline from local files (layout in the module docstring). ``limit``: first N
    examples of each task. ``max_length``: the model's context (default: lm-eval reads the config).
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_tasks(tasks)
    specs = [local_task_config(t, data_dir) for t in tasks] if data_dir is not None else list(tasks)
    device = str(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size,
              max_length=max_length)
    out = simple_evaluate(model=lm, tasks=specs, num_fewshot=0, limit=limit, task_manager=task_manager(),
                          log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    model.train(was_training)
    results = {}
    for task in tasks:
        raw = out["results"][task]
        results[task] = {m: float(raw[f"{m},none"]) for m in METRICS if f"{m},none" in raw}
        logger.info("zero-shot %s: %s", task, results[task])
    return results


def average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean ``acc`` over tasks, and mean ``acc_norm`` (a task without ``acc_norm`` counts its ``acc``)."""
    if not results:
        return {}
    accs = [r["acc"] for r in results.values()]
    norms = [r.get("acc_norm", r["acc"]) for r in results.values()]
    return {"acc": sum(accs) / len(accs), "acc_norm": sum(norms) / len(norms)}
