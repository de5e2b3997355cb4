"""compress.py: prune -> recover -> evaluate -> export -> report in one run folder, resumable by stage."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli_helpers import run_cli
from conftest import need_shared


def _argv(run_dir: Path, *extra: str) -> list[str]:
    stories = str(need_shared("models", "stories260K"))
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    short = run_dir.parent / "eval.txt"
    short.write_text(text.read_text()[:6000])
    return ["--base_model", stories, "--target_params", "220000", "--calibration_data", str(text),
            "--recover_tokens", "2048", "--curve_points", "2", "--ppl", str(short), "--run_dir", str(run_dir),
            "--device", "cpu", *extra]


@pytest.mark.slow
def test_a_tiny_model_end_to_end_with_kd_and_gguf(tmp_path):
    status, out, err = run_cli("compress.py", _argv(tmp_path / "run"))
    assert status == 0, err[-3000:]
    run = tmp_path / "run"
    assert "stages run: prune, recover, evaluate, export, report" in out
    assert all((run / s / ".done").is_file() for s in ("prune", "recover", "evaluate", "export", "report"))
    results = json.loads((run / "results.json").read_text())
    rows = results["evaluate"]["results"]
    assert set(rows) == {"dense", "pruned", "recovered"}
    assert rows["pruned"]["stats"]["params"] == rows["recovered"]["stats"]["params"] < rows["dense"]["stats"]["params"]
    assert results["recover"]["tokens"] == 2048 and results["recover"]["log_history"]
    assert [p["tokens"] for p in results["evaluate"]["curve"]] == [0, 1024, 2048]  # pruned, then checkpoints
    assert (run / "export" / "model.gguf").stat().st_size == results["export"]["bytes"] > 0
    report = (run / "report.md").read_text()
    for name in ("dense", "pruned", "recovered"):  # the report's figures are results.json's
        ppl = next(iter(rows[name]["ppl"].values()))
        assert re.search(rf"\| {name} \| {rows[name]['stats']['params']:,} \| .* \| {ppl:.2f} \|", report), name
    assert "python compress.py --base_model" in report
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "No plots" in report
    else:
        for png in ("layers.png", "recovery.png", "gain.png", "tradeoff.png"):
            assert (run / png).stat().st_size > 0 and f"]({png})" in report


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("broken", ["prune", "recover", "evaluate", "export", "report"])
def test_an_interrupted_stage_reruns_and_finished_ones_do_not(tmp_path, broken):
    from LLMPruner.compress.spec import STAGES, CompressSpec, run_stages
    spec = CompressSpec(base_model="m", run_dir=str(tmp_path / "run"))
    calls = {s: 0 for s in STAGES}
    fail = {"armed": True}

    def stage(name):
        def run(_spec):
            calls[name] += 1
            if name == broken and fail["armed"]:
                fail["armed"] = False
                raise Interrupt(name)
            return {"stage": name}
        return run
    stages = {s: stage(s) for s in STAGES}
    with pytest.raises(Interrupt):
        run_stages(spec, stages)
    before = STAGES[:STAGES.index(broken)]
    assert all((tmp_path / "run" / s / ".done").is_file() for s in before)
    assert not (tmp_path / "run" / broken / ".done").exists()
    assert run_stages(spec, stages) == list(STAGES[STAGES.index(broken):])  # the rerun resumes
    assert calls == {s: 1 if s in before or STAGES.index(s) > STAGES.index(broken) else 2 for s in STAGES}
    assert run_stages(spec, stages) == []  # all done: nothing reruns


def test_an_interrupted_recovery_resumes_from_its_last_checkpoint(tmp_path):
    from LLMPruner.compress.spec import CompressSpec, recover_argv
    spec = CompressSpec(base_model="m", run_dir=str(tmp_path))
    assert "--resume_from_checkpoint" not in recover_argv(spec)
    (tmp_path / "recover" / "checkpoint-4").mkdir(parents=True)
    argv = recover_argv(spec)
    assert argv[argv.index("--resume_from_checkpoint") + 1] == "last"
    assert argv[argv.index("--train_mode") + 1] == "full" and argv[argv.index("--distill_loss") + 1] == "kl"


@pytest.mark.parametrize("extra, message", [
    (["--target_params", "300000"], "--target_params 300000: the model has 260,032 parameters; ask for fewer"),
    (["--distill_on", "NOFILE"], "--distill_on 'NOFILE': the recovery needs a local .txt/.json/.jsonl file"),
    (["--run_dir", "/proc/llmpruner"], "--run_dir '/proc/llmpruner': cannot write"),
    (["--recover_tokens", "0"], "--recover_tokens 0: must be >= 1"),
])
def test_bad_input_stops_before_any_stage_in_one_line(tmp_path, extra, message):
    argv = _argv(tmp_path / "run")
    for flag in ("--target_params", "--run_dir"):
        if flag in extra:
            i = argv.index(flag)
            del argv[i:i + 2]
    status, _, err = run_cli("compress.py", argv + [str(tmp_path / e) if e == "NOFILE" else e for e in extra])
    lines = [line for line in err.splitlines() if "error" in line]
    assert status == 2 and len(lines) == 1 and message.replace("NOFILE", str(tmp_path / "NOFILE")) in lines[0], err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_another_command_is_not_mixed_in(tmp_path):
    from LLMPruner.compress.spec import CompressSpec
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spec.json").write_text(json.dumps({**CompressSpec("x", str(tmp_path / "run")).__dict__}))
    status, _, err = run_cli("compress.py", _argv(tmp_path / "run"))
    assert status == 2 and "holds a run of another command (it differs in base_model" in err, err
