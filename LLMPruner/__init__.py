"""LLMPruner: structural pruning of large language models.

One subpackage per stage of the method: ``discover`` (coupled structures, by tracing) -> ``score``
(importance) -> ``select`` (which units go; the plan) -> ``compensate`` (refit the kept weights) -> ``shrink``
(slice) -> ``recover`` (LoRA or distillation) -> ``evaluate`` -> ``export`` (GGUF); ``checkpoint`` reads and
writes models, ``experts`` prunes mixture-of-experts models, ``stream`` runs the stages a layer at a time.
``config`` holds every decision as data (``PruneConfig``, recipes), ``pipeline.prune_with`` runs it.
Architecture knowledge lives only in ``adapters``.
"""

__version__ = "0.1.0"

import importlib
import sys
import types

#: the public names and the module each lives in; imported on first use, so that ``LLMPruner.cli`` and
#: ``LLMPruner.options`` (what the scripts' argument parsers read) load without torch
_PUBLIC = {"load_model": "checkpoint", "load_pruned": "checkpoint", "save_pruned": "checkpoint",
           "PruningPlan": "plan", "prune": "prune", "apply_plan": "shrink", "PruneConfig": "config",
           "prune_with": "pipeline", "load_recipe": "recipe"}
__all__ = sorted(_PUBLIC)


class _Package(types.ModuleType):
    """``LLMPruner``: public names load on first use; the submodule ``prune`` never hides the function."""

    def __getattr__(self, name: str):
        if name not in _PUBLIC:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return  # the import system binding a submodule (LLMPruner.prune) over the public function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
