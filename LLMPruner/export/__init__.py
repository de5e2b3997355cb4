"""Export pruned models to other runtimes: GGUF for llama.cpp (``export_gguf``), per-layer shapes included.

See docs/gguf.md and ``python export.py --help``.
"""
from __future__ import annotations

from LLMPruner.export.gguf_arch import TARGETS, GGUFExportError, check_gguf_exportable, choose_target
from LLMPruner.export.gguf_out import OUTTYPES, export_gguf

__all__ = ["OUTTYPES", "TARGETS", "GGUFExportError", "check_gguf_exportable", "choose_target", "export_gguf"]
