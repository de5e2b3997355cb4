"""Run the real scripts' ``cli.run(main, ...)`` in this process (no interpreter start-up per case)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging

from conftest import REPO

_MODULES: dict = {}


def script(name: str):
    """The module of ``REPO/name`` (e.g. ``hf_prune.py``), imported once."""
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_script_{name[:-3]}", REPO / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def run_cli(name: str, argv: list[str]) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``name`` run on ``argv`` through the shared handler."""
    from LLMPruner import cli
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers = list(root.handlers)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(script(name).main, name, argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            for h in root.handlers[:]:  # a script's log-file handler must not outlive its run
                if h not in handlers:
                    root.removeHandler(h)
                    h.close()
    return status, out.getvalue(), err.getvalue()
