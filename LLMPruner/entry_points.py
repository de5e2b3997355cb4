"""Console commands of ``pip install -e .``: each runs the checkout's script of the same role.

    llmpruner-prune      = python hf_prune.py
    llmpruner-recover    = python post_training.py
    llmpruner-evaluate   = python evaluate.py
    llmpruner-generate   = python generate.py
    llmpruner-speedup    = python test_speedup.py
    llmpruner-compress   = python compress.py

The scripts stay the source of truth (and runnable as ``python hf_prune.py``); these wrappers only
locate them next to the package, so they need an editable install from a checkout.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def _run(script: str) -> None:
    path = CHECKOUT / script
    if not path.is_file():
        sys.exit(f"llmpruner: error: {path} is missing; the console commands need an editable install from a "
                 f"checkout (git clone ... && pip install -e .), or run python {script} there")
    sys.argv[0] = str(path)
    runpy.run_path(str(path), run_name="__main__")


def prune() -> None:
    _run("hf_prune.py")


def recover() -> None:
    _run("post_training.py")


def evaluate() -> None:
    _run("evaluate.py")


def generate() -> None:
    _run("generate.py")


def speedup() -> None:
    _run("test_speedup.py")


def compress() -> None:
    _run("compress.py")
