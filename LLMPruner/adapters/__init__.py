"""Per-architecture adapters, keyed by ``config.model_type`` (the only place that knows module names).

The dependency graph finds *which* parameters are coupled by tracing; an adapter only adds what tracing
cannot know: where the decoder layers are, what each kind of group is called, and which config fields to
write back after shrinking.
"""
from __future__ import annotations

from LLMPruner.adapters.base import Adapter, UnsupportedArchitectureError
from LLMPruner.adapters.bloom import BloomAdapter
from LLMPruner.adapters.gemma import GemmaAdapter
from LLMPruner.adapters.llama import CohereAdapter, GlmAdapter, LlamaAdapter, NonGatedAdapter, SinkAdapter
from LLMPruner.adapters.moe import MlaMoeAdapter, MoeAdapter
from LLMPruner.adapters.olmo import OlmoAdapter
from LLMPruner.adapters.opt import OptAdapter
from LLMPruner.adapters.phi3 import Phi3Adapter

_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> None:
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


for _adapter in (LlamaAdapter(), GemmaAdapter(), GlmAdapter(), OlmoAdapter(), NonGatedAdapter(), CohereAdapter(),
                 SinkAdapter(), Phi3Adapter(), OptAdapter(), BloomAdapter(), MoeAdapter(),
                 MlaMoeAdapter()):
    register(_adapter)


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(config_or_model) -> Adapter:
    """The adapter for a model or config; a clear error listing what is supported otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedArchitectureError(
            f"architecture model_type={model_type!r} has no LLMPruner adapter; "
            f"supported: {', '.join(supported_model_types())}")
    adapter = _ADAPTERS[model_type]
    adapter.check_config(config)
    return adapter


__all__ = ["Adapter", "UnsupportedArchitectureError", "get_adapter", "register", "supported_model_types"]
