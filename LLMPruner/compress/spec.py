"""From a dense model to a smaller, recovered, evaluated, deployable one: what a ``compress.py`` run is.

    prune -> recover -> evaluate -> export -> report         (one run folder, a subfolder per stage)

Each stage runs the project's own script for it (``hf_prune.py``, ``post_training.py``, ``evaluate.py``,
``export.py``) in a process of its own, so a stage is exactly what that command does (and the recovery can
run under ``torchrun``/``accelerate``: ``launcher``). A stage that finishes writes ``<stage>/.done`` with what
it produced; a rerun of the same command skips the finished stages and redoes the first unfinished one (an
interrupted recovery resumes from its last checkpoint). ``report`` writes ``report.md``, ``results.json`` and
the plots (``report.py``). Torch-free: the orchestration only builds command lines and reads JSON.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parents[2]
STAGES = ("prune", "recover", "evaluate", "export", "report")
DONE = ".done"
#: the recovery measured best on SmolLM2 -20 % (docs/recovery.md): full weights distilled from the dense
#: model, KL at T = 1, lr 2e-4 with a linear decay after a 10 % warm-up, blocks of 128 tokens, 8 per step
RECOVERY = {"kd": {"train_mode": "full", "distill_loss": "kl", "learning_rate": 2e-4},
            "lora": {"train_mode": "lora", "distill_loss": "none", "learning_rate": 2e-3}}


@dataclass
class CompressSpec:
    """Everything a compress run is asked to do (the command line, as data; saved as ``spec.json``)."""
    base_model: str
    run_dir: str
    recipe: str = "quality"
    config: str | None = None
    size_flags: list[str] = field(default_factory=list)   # --target_params N | --param_budget F | ...
    calibration_data: str = "c4"
    recover: str = "kd"                                   # kd | lora | none
    distill_on: str | None = None                         # default: the calibration text
    recover_tokens: int = 163_840
    block_tokens: int = 128
    batch_blocks: int = 8
    curve_points: int = 3                                 # checkpoints evaluated for the gain-vs-tokens curve
    kd_temperature: float = 1.0
    learning_rate: float | None = None
    export: str = "gguf"                                  # gguf | safetensors | none
    ppl: list[str] = field(default_factory=lambda: ["wikitext2", "ptb"])
    data_dir: str | None = None
    tasks: str = ""
    zeroshot_dir: str | None = None
    limit: int | None = None
    eval_seq_len: int = 128
    ppl_windows: int | None = None                        # the first N windows of each text (None: all)
    device: str | None = None
    launcher: str = ""                                    # e.g. "torchrun --nproc_per_node 4"
    extra_prune_flags: list[str] = field(default_factory=list)
    command: str = ""                                     # the command line that asked for this run

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.recover_tokens / (self.block_tokens * self.batch_blocks)))


def stage_dir(spec: CompressSpec, stage: str) -> Path:
    return Path(spec.run_dir) / stage


def is_done(spec: CompressSpec, stage: str) -> bool:
    return (stage_dir(spec, stage) / DONE).is_file()


def mark_done(spec: CompressSpec, stage: str, summary: dict) -> None:
    path = stage_dir(spec, stage)
    path.mkdir(parents=True, exist_ok=True)
    (path / DONE).write_text(json.dumps(summary, indent=2) + "\n")


def done_summary(spec: CompressSpec, stage: str) -> dict:
    return json.loads((stage_dir(spec, stage) / DONE).read_text())


def final_model(spec: CompressSpec) -> Path:
    """The model the run delivers: the recovered one, or the pruned one without recovery."""
    return stage_dir(spec, "recover") / "merged" if spec.recover != "none" else stage_dir(spec, "prune")


# --- the command line of each stage ------------------------------------------------------------------
def prune_argv(spec: CompressSpec) -> list[str]:
    out = Path(spec.run_dir)
    argv = ["hf_prune.py", "--base_model", spec.base_model, "--calibration_data", spec.calibration_data,
            "--log_dir", str(out), "--save_ckpt_log_name", "prune", "--save_model", *spec.size_flags,
            *spec.extra_prune_flags]
    argv += ["--config", spec.config] if spec.config else ["--recipe", spec.recipe]
    return argv + (["--device", spec.device, "--eval_device", spec.device] if spec.device else [])


def recover_argv(spec: CompressSpec) -> list[str]:
    out = stage_dir(spec, "recover")
    how = RECOVERY[spec.recover]
    save_steps = math.ceil(spec.steps / spec.curve_points)  # evenly spaced, the last at the final step
    argv = ["post_training.py", "--prune_model", str(stage_dir(spec, "prune")), "--output_dir", str(out),
            "--distill_on", spec.distill_on or spec.calibration_data, "--train_mode", how["train_mode"],
            "--distill_loss", how["distill_loss"], "--learning_rate", str(spec.learning_rate or how["learning_rate"]),
            "--max_steps", str(spec.steps), "--batch_size", str(spec.batch_blocks),
            "--micro_batch_size", str(min(4, spec.batch_blocks)), "--cutoff_len", str(spec.block_tokens),
            "--warmup_steps", str(max(1, spec.steps // 10)), "--val_set_size", "0",
            "--save_steps", str(save_steps), "--save_total_limit", str(spec.curve_points),
            "--logging_steps", str(max(1, spec.steps // 40)), "--seed", "0"]
    if how["distill_loss"] != "none":
        argv += ["--kd_temperature", str(spec.kd_temperature)]
    if how["train_mode"] == "lora":
        argv += ["--merge"]
    if any(out.glob("checkpoint-*")):
        argv += ["--resume_from_checkpoint", "last"]  # an interrupted recovery goes on from its last checkpoint
    return argv + (["--device", spec.device] if spec.device else [])


def evaluate_argv(spec: CompressSpec, checkpoints: dict[str, str], output: Path, *, tasks: bool = True) -> list[str]:
    argv = ["evaluate.py", "--checkpoints", *[f"{k}={v}" for k, v in checkpoints.items()], "--ppl", *spec.ppl,
            "--max_seq_len", str(spec.eval_seq_len), "--output_dir", str(output), "--overwrite", "--no_latency",
            "--tasks", spec.tasks if tasks else ""]
    for flag, value in (("--data_dir", spec.data_dir), ("--zeroshot_dir", spec.zeroshot_dir),
                        ("--limit", spec.limit), ("--device", spec.device), ("--ppl_windows", spec.ppl_windows)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def export_argv(spec: CompressSpec) -> list[str]:
    return ["export.py", "--model", str(final_model(spec)), "--outfile",
            str(stage_dir(spec, "export") / "model.gguf"), "--outtype", "f16"]


# --- running ---------------------------------------------------------------------------------------------
def run_script(argv: list[str], log: Path, launcher: str = "") -> None:
    """Run a checkout script (``argv[0]``) in its own process, its output appended to ``log``; a failure
    raises ``StageError`` with the script's own one-line error."""
    command = (shlex.split(launcher) if launcher else [sys.executable]) + [str(CHECKOUT / argv[0]), *argv[1:]]
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s", " ".join(shlex.quote(c) for c in command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("a") as f:
        f.write(f"$ {' '.join(shlex.quote(c) for c in command)}\n")
        f.flush()
        proc = subprocess.run(command, stdout=f, stderr=subprocess.PIPE, text=True, env=env, cwd=CHECKOUT)
        f.write(proc.stderr)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if ": error: " in line or "interrupted" in line]
        raise StageError(lines[-1] if lines else f"{argv[0]} exited with status {proc.returncode}; see {log}")


class StageError(RuntimeError):
    """A stage's script failed; the message is its own one-line error."""


def run_stages(spec: CompressSpec, stages: dict[str, object]) -> list[str]:
    """Run every unfinished stage in order (``stages[name](spec) -> summary``); returns those it ran."""
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(spec.run_dir) / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    ran = []
    for name in STAGES:
        if is_done(spec, name):
            logger.info("stage %s: done before, skipped", name)
            continue
        start = time.perf_counter()
        logger.info("stage %s ...", name)
        summary = stages[name](spec)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        mark_done(spec, name, summary)
        ran.append(name)
    return ran
