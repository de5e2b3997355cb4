"""Which llama.cpp architecture a (pruned) model is written as: decisions as data.

llama.cpp reads ``{arch}.attention.head_count``, ``head_count_kv`` and ``feed_forward_length`` either as
one number or as one number per layer, but only some architectures build their tensors per layer. In the
llama.cpp vendored by llama-cpp-python 0.3.36 (``src/models/*.cpp``):

- ``llama`` sizes every layer from layer 0 (``hparams.n_head()``, ``n_ff()``): uniform models only.
- ``deci`` (NVIDIA's Nemotron-51B, a pruned Llama-3.1) sizes each layer ``i`` by ``n_head(i)``,
  ``n_head_kv(i)``, ``n_ff(i)``, with the LLaMA block otherwise (RMSNorm, rotary in the interleaved
  layout, SwiGLU, optional q/k/v/o and MLP biases): heterogeneous LLaMA-family models go there.
- ``qwen2`` sizes q/o by ``n_embd`` (no pruned heads possible) and ``qwen3`` has per-head q/k norms in
  the NeoX rotary layout, sized from layer 0: Qwen2 (LLaMA + q/k/v biases) is written as llama/deci,
  Qwen3 only when uniform, as ``qwen3``.
"""
from __future__ import annotations

from dataclasses import dataclass


class GGUFExportError(ValueError):
    """A model the GGUF exporter cannot write: the message names the architecture and the fallback."""


@dataclass(frozen=True)
class Target:
    uniform: str                 # llama.cpp architecture for models whose layers all have one shape
    heterogeneous: str | None    # ... for per-layer shapes; None: llama.cpp cannot run them
    permute_qk: bool             # HF rotate-half rows -> llama.cpp's interleaved rotary rows


#: config.model_type -> how llama.cpp runs it
TARGETS: dict[str, Target] = {
    "llama": Target(uniform="llama", heterogeneous="deci", permute_qk=True),
    "mistral": Target(uniform="llama", heterogeneous="deci", permute_qk=True),
    "qwen2": Target(uniform="llama", heterogeneous="deci", permute_qk=True),
    "qwen3": Target(uniform="qwen3", heterogeneous=None, permute_qk=False),
}

SAFETENSORS_FALLBACK = ("keep the safetensors folder (LLMPruner.load_pruned, or transformers with "
                        "trust_remote_code=True)")


def choose_target(model_type: str, uniform: bool) -> tuple[str, Target]:
    """``(llama.cpp architecture, target)`` for a model of ``model_type``; a ``GGUFExportError`` that names
    the fallback when llama.cpp cannot run it."""
    target = TARGETS.get(model_type)
    if target is None:
        raise GGUFExportError(
            f"model_type {model_type!r}: the GGUF exporter writes {sorted(TARGETS)} only. "
            + ("A uniformly pruned folder is a stock transformers checkpoint: llama.cpp's own "
               "convert_hf_to_gguf.py converts it; or " if uniform else
               f"llama.cpp has no architecture that runs {model_type!r} with per-layer shapes: prune "
               "uniformly (the same ratio in every layer, no --param_budget) or ")
            + SAFETENSORS_FALLBACK)
    if uniform:
        return target.uniform, target
    if target.heterogeneous is None:
        raise GGUFExportError(
            f"model_type {model_type!r} with per-layer shapes: llama.cpp's {target.uniform!r} architecture "
            "sizes every layer like layer 0, and no per-layer architecture has its layout; prune uniformly "
            f"(the same ratio in every layer, no --param_budget) or {SAFETENSORS_FALLBACK}")
    return target.heterogeneous, target


def check_gguf_exportable(model) -> None:
    """Fail early (before pruning) for a model type the exporter cannot write at all."""
    choose_target(model.config.model_type, uniform=True)
