"""LLMPruner: structural pruning of large language models (discover -> score -> select -> shrink -> recover).

The stages live in modules of the same name: ``graph`` (dependency discovery by tracing), ``estimate``
(importance scores), ``select`` (a pruning plan), ``shrink`` (physically slicing weights), ``recover``
(LoRA post-training) and ``evaluate``. Architecture knowledge lives only in ``adapters``.
"""

__version__ = "0.1.0"

from .checkpoint import load_model, load_pruned, save_pruned  # noqa: E402
from .plan import PruningPlan  # noqa: E402
from .prune import prune  # noqa: E402
from .shrink import apply_plan  # noqa: E402

__all__ = ["PruningPlan", "apply_plan", "load_model", "load_pruned", "prune", "save_pruned"]
