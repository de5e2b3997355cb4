"""LLaMA-style decoders: LLaMA 1/2/3, Vicuna, TinyLlama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms
per head_dim, shared by all heads: tracing leaves them out of every group), Granite (scalar multipliers,
constants of the config that pruning leaves alone), GLM (fused gate_up_proj), and the same layout with
other details tracing handles: Ministral / Ministral 3, EXAONE 4, Cohere 2 and CWM (sliding and full
layers), SmolLM3 (layers without RoPE), Hunyuan dense (per-head q/k
norms), Seed-OSS (q/k/v biases), InternLM3, ERNIE 4.5 (dense), IQuest-Coder, HyperCLOVA X, Helium (its
stock ``o_proj`` is hidden x hidden, so only ``load_pruned`` rebuilds a model whose heads were pruned).

Per-layer lists in the config (``layer_types``, SmolLM3's ``no_rope_layers``) follow the layers that
depth pruning keeps, so a stock ``from_pretrained`` rebuilds each kept layer as it was.

All share ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (GLM:
``mlp.gate_up_proj``). Per-layer sizes are read from the weights: heads from ``o_proj``'s input, KV heads
from ``k_proj``'s output, MLP channels from ``down_proj``'s input.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from LLMPruner.structure import LayerShape, ModelStructure
from LLMPruner.adapters.base import Adapter, UnsupportedArchitectureError, constructible_heads

Projection = tuple[nn.Module, str, int, int]  # (parent module, attribute, fan_in, fan_out)


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "granite", "ministral", "ministral3", "smollm3", "exaone4",
                   "cohere2", "hunyuan_v1_dense", "seed_oss", "internlm3", "ernie4_5", "cwm", "iquestcoder",
                   "hyperclovax", "helium")
    #: config lists with one entry per decoder layer
    per_layer_config = ("layer_types", "no_rope_layers", "layer_shapes")
    module_kinds = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                    "o_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    bias_flags = {"attention": "attention_bias", "mlp": "mlp_bias"}

    def enable_biases(self, model: nn.Module, kind) -> None:
        flag = self.bias_flags[kind]
        if not hasattr(model.config, flag):
            raise ValueError(f"--compensation bias: model_type {model.config.model_type!r} has no {flag} "
                             f"config flag, so added biases would not load; use --compensation refit")
        setattr(model.config, flag, True)
        for layer in self.decoder_layers(model):
            for name, module in layer.named_modules():
                if self.kind_of(name) == kind and isinstance(module, nn.Linear) and module.bias is None:
                    w = module.weight
                    module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def keep_decoder_layers(self, model: nn.Module, keep: list[int]) -> None:
        old = model.model.layers
        model.model.layers = nn.ModuleList([old[i] for i in keep])
        for new_idx, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new_idx
        config = model.config
        for name in self.per_layer_config:
            if getattr(config, name, None) is not None:
                setattr(config, name, [getattr(config, name)[i] for i in keep])
        config.num_hidden_layers = len(keep)

    def head_dim(self, model: nn.Module) -> int:
        config = model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def kv_heads(self, layer: nn.Module, heads: int, head_dim: int) -> int:
        return layer.self_attn.k_proj.weight.shape[0] // head_dim

    def read_structure(self, model: nn.Module) -> ModelStructure:
        head_dim = self.head_dim(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        shapes = []
        for layer in self.decoder_layers(model):
            heads = layer.self_attn.o_proj.weight.shape[1] // head_dim
            shapes.append(LayerShape(num_attention_heads=heads,
                                     num_key_value_heads=self.kv_heads(layer, heads, head_dim),
                                     intermediate_size=self.mlp_width(layer.mlp, model.config)))
        return ModelStructure(hidden_size=hidden, head_dim=head_dim, layers=shapes)

    def mlp_width(self, mlp: nn.Module, config) -> int:
        """A layer's MLP channels, read from ``down_proj``'s input."""
        return mlp.down_proj.weight.shape[1]

    def update_config(self, model: nn.Module) -> ModelStructure:
        structure = self.read_structure(model)
        config = model.config
        config.head_dim = structure.head_dim  # explicit: hidden/heads no longer gives it
        config.hidden_size = structure.hidden_size
        config.num_hidden_layers = structure.num_hidden_layers
        layers = structure.layers
        heads = max(s.num_attention_heads for s in layers)
        kv_heads = max(s.num_key_value_heads for s in layers)
        # the stock config must validate (hidden % heads): otherwise placeholders + layer_shapes
        config.num_attention_heads, config.num_key_value_heads = constructible_heads(
            structure.hidden_size, heads, kv_heads)
        config.intermediate_size = max(s.intermediate_size for s in layers)
        if structure.is_uniform() and (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads):
            if hasattr(config, "layer_shapes"):
                del config.layer_shapes
        else:
            config.layer_shapes = [vars(s).copy() for s in layers]
        for layer, s in zip(self.decoder_layers(model), layers):
            self.update_layer(layer, s, config)
        return structure

    def update_layer(self, layer: nn.Module, shape: LayerShape, config) -> None:
        """Module attributes that the forward reads instead of inferring from the weights."""
        assert shape.num_attention_heads % shape.num_key_value_heads == 0, shape
        layer.self_attn.num_key_value_groups = shape.num_attention_heads // shape.num_key_value_heads
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = shape.intermediate_size

    def projections(self, layer: nn.Module, shape: LayerShape, hidden: int, head_dim: int) -> list[Projection]:
        attn, mlp = layer.self_attn, layer.mlp
        q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
        inter = shape.intermediate_size
        return [(attn, "q_proj", hidden, q), (attn, "k_proj", hidden, kv), (attn, "v_proj", hidden, kv),
                (attn, "o_proj", q, hidden), (mlp, "gate_proj", hidden, inter), (mlp, "up_proj", hidden, inter),
                (mlp, "down_proj", inter, hidden)]

    def resize_layer(self, layer: nn.Module, shape: LayerShape, hidden_size: int, head_dim: int) -> None:
        for parent, name, fan_in, fan_out in self.projections(layer, shape, hidden_size, head_dim):
            old = getattr(parent, name)
            new = nn.Linear(fan_in, fan_out, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            setattr(parent, name, new)
        self.update_layer(layer, shape, getattr(layer.self_attn, "config", None))


class GlmAdapter(LlamaAdapter):
    """GLM (``GlmForCausalLM``, ChatGLM's successor in transformers) and GLM-4-0414 (``Glm4ForCausalLM``,
    with post-attention and post-MLP norms that tracing joins with the hidden size): LLaMA-like with a fused
    ``gate_up_proj`` (rows ``[gate; up]``, split by ``chunk(2)``: tracing pairs row i with row i + I)."""

    model_types = ("glm", "glm4")
    module_kinds = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                    "o_proj": "attention", "gate_up_proj": "mlp", "down_proj": "mlp"}
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")

    def projections(self, layer: nn.Module, shape: LayerShape, hidden: int, head_dim: int) -> list[Projection]:
        attn, mlp = layer.self_attn, layer.mlp
        q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
        inter = shape.intermediate_size
        return [(attn, "q_proj", hidden, q), (attn, "k_proj", hidden, kv), (attn, "v_proj", hidden, kv),
                (attn, "o_proj", q, hidden), (mlp, "gate_up_proj", hidden, 2 * inter),
                (mlp, "down_proj", inter, hidden)]


class NonGatedAdapter(LlamaAdapter):
    """LLaMA layout with a two-projection MLP (``up_proj`` -> activation -> ``down_proj``): Arcee (ReLU²),
    Apertus (xIELU, per-head q/k norms), Nemotron (ReLU², LayerNorm1P, partial rotary), Jais 2 (biases
    everywhere, LayerNorm)."""

    model_types = ("arcee", "apertus", "nemotron", "jais2")
    module_kinds = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                    "o_proj": "attention", "up_proj": "mlp", "down_proj": "mlp"}
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")

    def projections(self, layer: nn.Module, shape: LayerShape, hidden: int, head_dim: int) -> list[Projection]:
        return [p for p in super().projections(layer, shape, hidden, head_dim) if p[1] != "gate_proj"]


class CohereAdapter(LlamaAdapter):
    """Cohere's Command R (parallel attention and MLP on one LayerNorm, logit scale): LLaMA names. With
    ``use_qk_norm`` (Command R+) each head has its own row of a ``[heads, head_dim]`` q/k LayerNorm weight,
    which tracing does not slice with the head: refused, naming the option."""

    model_types = ("cohere",)

    def check_config(self, config) -> None:
        if getattr(config, "use_qk_norm", False):
            raise UnsupportedArchitectureError(
                "model_type 'cohere' with use_qk_norm=True (Command R+): its per-head q/k LayerNorm weights "
                "[heads, head_dim] are not sliced with the heads yet; Command R without use_qk_norm is supported")


class SinkAdapter(LlamaAdapter):
    """LLaMA names with one learned attention-sink logit per query head (``self_attn.sinks``, as GPT-OSS):
    tracing keeps each head's sink with its head; a layer rebuilt at a pruned shape gets as many sinks."""

    model_types = ("granite_swa",)

    def resize_layer(self, layer: nn.Module, shape: LayerShape, hidden_size: int, head_dim: int) -> None:
        super().resize_layer(layer, shape, hidden_size, head_dim)
        old = layer.self_attn.sinks
        layer.self_attn.sinks = nn.Parameter(torch.empty(shape.num_attention_heads, dtype=old.dtype,
                                                         device=old.device))
