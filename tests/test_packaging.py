"""pyproject.toml: the package, requirements.txt's ranges, extras, console commands; bench/ from any folder."""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, need_shared

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ENV = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}.items() if k != "PYTHONPATH"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [re.sub(r"\s+", "", line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


def test_dependencies_are_requirements_txt_and_extras_are_the_optional_parts():
    meta = project()
    assert meta["dependencies"] == requirements("requirements.txt")
    extras = meta["optional-dependencies"]
    assert extras["eval"] == ["lm-eval>=0.4.9"] and extras["ui"] == ["gradio>=4"]
    assert extras["report"] == ["matplotlib>=3.7"]
    assert set(requirements("requirements-dev.txt")) <= set(extras["dev"])


def test_console_commands_run_the_checkout_scripts():
    from LLMPruner import entry_points
    scripts = project()["scripts"]
    assert set(scripts) == {"llmpruner-prune", "llmpruner-recover", "llmpruner-evaluate", "llmpruner-generate",
                            "llmpruner-speedup", "llmpruner-compress"}
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))
    for script in ("hf_prune.py", "post_training.py", "evaluate.py", "generate.py", "test_speedup.py", "compress.py"):
        assert (entry_points.CHECKOUT / script).is_file()


def test_evaluate_defaults_to_perplexity_only_without_lm_eval(monkeypatch, caplog, tmp_path):
    import importlib.util

    from cli_helpers import script
    parse = script("evaluate.py").parse_args
    argv = ["--checkpoints", f"b={REPO}", "--ppl", "--output_dir", str(tmp_path)]  # REPO: any existing path
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with caplog.at_level("WARNING"):
        assert parse(argv).tasks == ""
    assert "lm-eval is not installed: perplexity and statistics only" in caplog.text
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("lm_eval") is not None:
        assert parse([*argv, "--zeroshot_dir", str(tmp_path)]).tasks.split(",")[0] == "boolq"


@pytest.mark.slow
def test_a_bench_script_and_an_installed_command_work_from_another_folder(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "stats_stories.py"), "--help"], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "--shared" in run.stdout, run.stderr[-2000:]
    command = shutil.which("llmpruner-speedup")
    if command is None:
        pytest.skip("llmpruner is not pip-installed here (pip install -e .): console commands not on PATH")
    model = need_shared("models", "stories260K")
    run = subprocess.run([command, "--model_type", "pretrain", "--base_model", str(model), "--device", "cpu"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "0.2600 M" in run.stdout, run.stderr[-2000:]


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name
    lines = [line.strip() for line in (REPO / "requirements.lock").read_text().splitlines()]
    return {canonicalize_name(name): version for name, _, version in
            (line.partition("==") for line in lines if line and not line.startswith("#"))}


def test_the_lock_pins_every_requirement_within_its_range_and_leaves_torch_to_the_user():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    pins = _pins()
    assert "torch" not in pins  # the build for the user's machine is installed first (README, "Installing")
    assert all(version for version in pins.values()), "every line of requirements.lock is NAME==VERSION"
    for text in project()["dependencies"] + project()["optional-dependencies"]["dev"]:
        req = Requirement(text)
        if req.name == "torch":
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.lock does not pin {req.name} (bash .ci/lock regenerates it)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_ci_runs_the_readmes_test_command_which_installs_through_the_lock():
    command = subprocess.run([sys.executable, str(REPO / ".ci" / "readme_command.py"), str(REPO / "README.md")],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert command == 'pip install -c requirements.lock -e ".[dev]" && python -m pytest -q tests'
    ci = (REPO / ".ci" / "run").read_text()
    assert '.ci/readme_command.py README.md' in ci and 'bash -c "$command"' in ci
    assert "python3 -m venv" in ci and "pip install -q torch==2.13.0" in ci
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("```bash", 1)[1]
    assert "pip install -c requirements.lock -e ." in quick_start.split("```", 1)[0]
