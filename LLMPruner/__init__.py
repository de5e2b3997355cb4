"""LLMPruner: structural pruning of large language models (discover -> score -> select -> shrink -> recover).

The stages live in modules of the same name: ``graph`` (dependency discovery by tracing), ``estimate``
(importance scores), ``select`` (a pruning plan), ``shrink`` (physically slicing weights), ``recover``
(LoRA post-training) and ``evaluate``. Architecture knowledge lives only in ``adapters``.
"""

__version__ = "0.1.0"
